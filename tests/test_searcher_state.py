"""A sweep's searcher survives Ray's own save and restore, for each sampler cxrtune builds.

Tune pickles the searcher object into ``tuner.pkl`` when an experiment starts, then saves its
state with ``SearchGenerator(ConcurrencyLimiter(searcher)).save_to_dir`` as trials report, and a
resumed sweep unpickles the object and calls ``restore_from_dir``. A sampler that cannot be
pickled (Optuna 5.1's NSGA-II) fails the sweep at its first save; this test drives the same calls
without starting Ray.
"""

from __future__ import annotations

from dataclasses import replace

import optuna
import pytest
from ray import cloudpickle
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.search_generator import SearchGenerator

from cxrtune.search.tuning import TuneOptions, _searcher, local_journal, optuna_sampler

SPACE = {
    "task": "disease", "objective": "dice_cls",
    "fixed": {"batch_size": 4, "size": 64, "model": {"in_channels": 1}},
    "parameters": {
        "arch": {"type": "choice", "values": ["FPN", "Linknet"]},
        "encoder": {"type": "choice", "given": "arch",  # conditional: what multivariate + group TPE is for
                    "values": {"FPN": ["resnet18", "resnet34"], "default": ["resnet18"]}},
        "lr": {"type": "log-float", "low": 1e-5, "high": 1e-2},
    },
}
MODES = {"tpe": {"sampler": "tpe"}, "random": {"sampler": "random"}, "gp": {"sampler": "gp"},
         "multi-objective tpe": {"multi_objective": True, "scheduler": "none"},
         "multi-objective gp": {"multi_objective": True, "scheduler": "none", "sampler": "gp"},
         "multi-objective random": {"multi_objective": True, "scheduler": "none", "sampler": "random"}}


def options(tmp_path, mode: str) -> TuneOptions:
    return TuneOptions(space=SPACE, manifest="unused", name="state-" + mode.replace(" ", "-"), storage=str(tmp_path / "exps"),
                       num_samples=8, max_epochs=2, seed=3, **MODES[mode])


def result(o: TuneOptions, value: float, epochs: int | None = None) -> dict:
    return {"val_dice_f1": value, "gmacs": 10 * value, "training_iteration": epochs or o.max_epochs}


def study_of(alg: SearchGenerator) -> optuna.Study:
    return alg.searcher.searcher._ot_study  # SearchGenerator -> ConcurrencyLimiter -> CxrtuneOptunaSearch


def trials_of(study: optuna.Study) -> list[tuple]:
    return [(t.number, t.state, t.params, t.values) for t in study.get_trials(deepcopy=False)]


@pytest.mark.parametrize("mode", list(MODES))
def test_searcher_survives_rays_save_and_restore(mode, tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_OPTUNA_DIR", str(tmp_path / "optuna"))
    o = options(tmp_path, mode)
    searcher = _searcher(o, o.search_space())
    tuner_pkl = cloudpickle.dumps(searcher)  # what Tuner writes to tuner.pkl at the start
    alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    first = [alg.searcher.suggest(t) for t in ("t1", "t2")]
    alg.on_trial_complete("t1", result(o, 0.4))
    (tmp_path / "state").mkdir()  # Tune's driver staging folder
    alg.save_to_dir(str(tmp_path / "state"), session_str="s1")  # Tune's periodic experiment save

    before = study_of(alg)
    expected = trials_of(before)
    local_journal(o).unlink()  # resumed on another machine: the study comes from the copy beside the experiment
    restored = SearchGenerator(ConcurrencyLimiter(cloudpickle.loads(tuner_pkl), max_concurrent=2))
    restored.restore_from_dir(str(tmp_path / "state"))  # what a resumed sweep does

    after = study_of(restored)
    assert local_journal(o).exists() and trials_of(after) == expected  # the finished trial, and the running one
    assert [t.state for t in after.get_trials()] == [optuna.trial.TrialState.COMPLETE,
                                                     optuna.trial.TrialState.RUNNING]
    assert after.directions == ([optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
                                if o.multi_objective else [optuna.study.StudyDirection.MAXIMIZE])
    sampler = after.sampler
    assert type(sampler) is type(optuna_sampler(o))
    if o.sampler == "tpe":  # budget-sized start-up; multivariate (Optuna 5's default for one objective)
        assert sampler._n_startup_trials == 2 and sampler._is_multivariate(after)
        assert sampler._group is o.multi_objective  # both objectives over the conditional encoder
    if o.sampler == "gp":  # the same start-up; the conditional encoder drawn by a univariate TPE
        assert sampler._n_startup_trials == 2
        assert isinstance(sampler._independent_sampler, optuna.samplers.TPESampler)
        assert sampler._independent_sampler._multivariate is False
    # the restored searcher goes on: the running trial completes, a new one is proposed and told
    third = restored.searcher.suggest("t3")
    assert third is not None and set(third) >= {"arch", "lr"} and third not in first
    restored.on_trial_complete("t2", result(o, 0.6))
    restored.on_trial_complete("t3", result(o, 0.5))
    states = [t.state for t in after.get_trials()]
    assert states == [optuna.trial.TrialState.COMPLETE] * 3
    values = [t.values for t in after.get_trials()]
    assert values == ([[0.4, 4.0], [0.6, 6.0], [0.5, 5.0]] if o.multi_objective else [[0.4], [0.6], [0.5]])


def test_a_database_study_keeps_its_password_out_of_the_url_and_rays_pickles(postgres, tmp_path, monkeypatch):
    """An Optuna study in a real PostgreSQL: the password comes from CXRTUNE_OPTUNA_PASSWORD, and
    neither the pickled searcher (tuner.pkl) nor its saved state holds it; a restored searcher
    reconnects with the password it reads again; a URL holding a password is refused unquoted."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.search.study_storage import PASSWORD_ENV, PASSWORD_FILE_ENV

    url, password = postgres
    monkeypatch.setenv(PASSWORD_ENV, password)
    o = TuneOptions(**{**options(tmp_path, "tpe").__dict__, "name": "db-study", "optuna_storage": url})
    searcher = _searcher(o, o.search_space())
    tuner_pkl = cloudpickle.dumps(searcher)
    alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=2))
    alg.searcher.suggest("t1")
    alg.on_trial_complete("t1", result(o, 0.4))
    (tmp_path / "state").mkdir()
    alg.save_to_dir(str(tmp_path / "state"), session_str="s1")
    saved = [tuner_pkl, *(f.read_bytes() for f in (tmp_path / "state").rglob("*") if f.is_file())]
    assert len(saved) > 1 and not [b for b in saved if password.encode() in b]

    study = optuna.load_study(study_name="db-study", storage=optuna.storages.RDBStorage(
        url, engine_kwargs={"connect_args": {"password": password}}))
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE]  # the study is in the database

    # resumed elsewhere, with the password in an owner-only file instead of the variable
    monkeypatch.delenv(PASSWORD_ENV)
    secret_file = tmp_path / "db-password"
    secret_file.write_text(password + "\n")
    secret_file.chmod(0o600)
    monkeypatch.setenv(PASSWORD_FILE_ENV, str(secret_file))
    restored = SearchGenerator(ConcurrencyLimiter(cloudpickle.loads(tuner_pkl), max_concurrent=2))
    restored.restore_from_dir(str(tmp_path / "state"))
    assert trials_of(study_of(restored)) == trials_of(study)
    monkeypatch.delenv(PASSWORD_FILE_ENV)

    for with_password in (url.replace("cxrtune@", f"cxrtune:{password}@"), f"{url}?password={password}"):
        with pytest.raises(CxrtuneError, match="holds a password") as refused:
            TuneOptions(**{**o.__dict__, "optuna_storage": with_password})
        assert password not in str(refused.value)
    with pytest.raises(CxrtuneError, match=f"cannot open the Optuna storage {url}: .*"
                                           "(password authentication failed|no password supplied)"):
        _searcher(o, o.search_space())  # the password is nowhere else


def rng_state(sampler) -> list:
    """The random states of a TPE sampler and of its start-up random sampler (of a GP sampler, and
    of its per-parameter TPE's), comparable."""
    tpe = getattr(sampler, "_independent_sampler", sampler)
    rngs = ([sampler._rng.rng] if tpe is not sampler else []) + [tpe._rng.rng, tpe._random_sampler._rng.rng]
    return [[int(v) for v in rng.get_state()[1]] + [rng.get_state()[2]] for rng in rngs]


@pytest.mark.parametrize("sampler", ["tpe", "gp"])
def test_a_multi_objective_searcher_keeps_constraints_and_pruned_trials_across_resume(sampler, tmp_path, monkeypatch):
    """Several objectives with ASHA and a constraint, saved and restored as a killed driver's sweep
    is: the constraint (set on each trial before it is told) is stored in the study and survives;
    a trial stopped before its last epoch is PRUNED without values; ``best_trials`` holds only
    complete, feasible trials; the restored sampler proposes no configuration twice."""
    monkeypatch.setenv("CXRTUNE_OPTUNA_DIR", str(tmp_path / "optuna"))
    o = TuneOptions(space=SPACE, manifest="unused", name="mo-asha", storage=str(tmp_path / "exps"), num_samples=8,
                    max_epochs=2, seed=5, multi_objective=True, scheduler="asha", grace=1,
                    constraints=["val_dice_f1>=0.3"], sampler=sampler)
    searcher = _searcher(o, o.search_space())
    tuner_pkl = cloudpickle.dumps(searcher)
    alg = SearchGenerator(ConcurrencyLimiter(searcher, max_concurrent=4))
    proposed = [alg.searcher.suggest(t) for t in ("t1", "t2", "t3", "t4")]
    alg.on_trial_complete("t1", result(o, 0.6))  # complete, feasible
    alg.on_trial_complete("t2", result(o, 0.2))  # complete, violates val_dice_f1 >= 0.3 (and cheaper than t1)
    alg.on_trial_complete("t3", result(o, 0.9, epochs=1))  # cut by ASHA after epoch 1: never on the front
    (tmp_path / "state").mkdir()
    alg.save_to_dir(str(tmp_path / "state"), session_str="s1")
    local_journal(o).unlink()  # the driver's machine is gone with it
    saved_rng = rng_state(study_of(alg).sampler)
    fresh = cloudpickle.loads(tuner_pkl)  # the searcher as the sweep started: what a lost state would give

    restored = SearchGenerator(ConcurrencyLimiter(cloudpickle.loads(tuner_pkl), max_concurrent=4))
    restored.restore_from_dir(str(tmp_path / "state"))
    study = study_of(restored)
    # the sampler goes on from where it was, not from its seed again
    assert rng_state(study.sampler) == saved_rng != rng_state(fresh._ot_study.sampler)
    T = optuna.trial.TrialState
    assert [t.state for t in study.get_trials()] == [T.COMPLETE, T.COMPLETE, T.PRUNED, T.RUNNING]
    assert [t.constraints for t in study.get_trials()[:3]] == [{"val_dice_f1": pytest.approx(-0.3)},
                                                               {"val_dice_f1": pytest.approx(0.1)},
                                                               {"val_dice_f1": pytest.approx(-0.6)}]
    assert study.get_trials()[2].values is None  # pruned: no invented point in objective space
    more = [restored.searcher.suggest(t) for t in ("t5", "t6", "t7")]
    restored.on_trial_complete("t4", result(o, 0.5))
    for i, t in enumerate(("t5", "t6", "t7")):
        restored.on_trial_complete(t, result(o, 0.35 + 0.1 * i))
    configs = [tuple(sorted(c.items())) for c in proposed + more]
    assert len(set(configs)) == len(configs)  # nothing proposed twice across the restart
    front = {t.number for t in study.best_trials}
    assert front and 1 not in front and 2 not in front  # the violator and the pruned trial are never on it
    assert all(t.constraints["val_dice_f1"] <= 0 and t.state == T.COMPLETE for t in study.best_trials)
    if sampler == "gp":
        # past its start-up (two complete trials) the GP itself proposed, not its per-parameter TPE
        # (Optuna records the GP's relative sample on the trial) ...
        modelled = [t.number for t in study.get_trials() if "gp:relative_params:0" in t.system_attrs]
        assert modelled and min(modelled) >= 4
        # ... and a searcher saved with a fitted GP is restored and goes on
        restored.save_to_dir(str(tmp_path / "state"), session_str="s2")
        again = SearchGenerator(ConcurrencyLimiter(cloudpickle.loads(tuner_pkl), max_concurrent=4))
        again.restore_from_dir(str(tmp_path / "state"))
        assert again.searcher.suggest("t8") is not None
        assert "gp:relative_params:0" in study_of(again).get_trials()[-1].system_attrs


def test_a_start_up_set_by_hand_draws_random_searchs_configurations_after_the_warm_start(tmp_path, monkeypatch):
    """``--startup-trials``: TPE draws its start-up as random search with the same seed does, and
    a warm start that sets every parameter uses none of those draws, so bench/sweep.py's
    ``tpe_half_startup`` and its random search share their first configurations and differ only
    in what TPE draws after."""
    from cxrtune.errors import CxrtuneError

    monkeypatch.setenv("CXRTUNE_OPTUNA_DIR", str(tmp_path / "optuna"))
    tpe = replace(options(tmp_path, "multi-objective tpe"), name="tpe", startup_trials=5)
    rnd = replace(options(tmp_path, "multi-objective random"), name="random")
    assert optuna_sampler(tpe)._n_startup_trials == 5
    assert optuna_sampler(replace(tpe, startup_trials=None))._n_startup_trials == 2  # a quarter of 8 trials
    gp = optuna_sampler(replace(tpe, sampler="gp"))
    assert gp._n_startup_trials == 5 and gp._independent_sampler._n_startup_trials == 5

    def drawn(o: TuneOptions, warm_start: list[dict], n: int) -> list[dict]:
        searcher = _searcher(o, o.search_space(), warm_start)
        configs = []
        for k in range(n):
            configs.append(searcher.suggest(f"t{k}"))
            searcher.on_trial_complete(f"t{k}", result(o, 0.1 + 0.05 * k))
        return configs

    tpe_configs = drawn(tpe, [{"arch": "FPN", "encoder": "resnet34", "lr": 1e-3}], 5)
    random_configs = drawn(rnd, [], 4)
    assert tpe_configs[0] == {"arch": "FPN", "encoder|FPN": "resnet34", "lr": 1e-3}
    assert tpe_configs[1:] == random_configs and len({c["lr"] for c in random_configs}) == 4
    for bad in (0, 9):
        with pytest.raises(CxrtuneError, match="--startup-trials must be between 1 and --num-samples"):
            replace(tpe, startup_trials=bad)


@pytest.mark.parametrize("mode", ["tpe", "multi-objective tpe"])
def test_a_restored_trial_the_searcher_never_proposed_runs_untold(mode, tmp_path, monkeypatch, caplog):
    """A searcher state saved a step before Tune's (a driver killed between the two uploads) lacks
    a trial Tune restores: its results and completion are not the study's, and do not end the
    sweep (Ray's OptunaSearch raised KeyError for the single-objective results)."""
    monkeypatch.setenv("CXRTUNE_OPTUNA_DIR", str(tmp_path / "optuna"))
    o = options(tmp_path, mode)
    alg = SearchGenerator(ConcurrencyLimiter(_searcher(o, o.search_space()), max_concurrent=2))
    alg.searcher.suggest("t1")
    with caplog.at_level("WARNING", logger="cxrtune"):
        alg.searcher.searcher.on_trial_result("ghost", {**result(o, 0.5), "training_iteration": 1})
        alg.searcher.searcher.on_trial_complete("ghost", result(o, 0.5))
    assert caplog.text.count("trial ghost is not in the restored searcher") == 1
    alg.on_trial_complete("t1", result(o, 0.4))
    assert [t.state for t in study_of(alg).trials] == [optuna.trial.TrialState.COMPLETE]  # t1 only


def test_a_storage_url_with_any_password_parameter_or_a_bad_port_is_refused_unquoted():
    """libpq's sslpassword (a client key's passphrase) is a secret as much as password is; a port
    that is no number is a clear error, not a ValueError."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.search.study_storage import check_storage_url

    for url in ("postgresql://u@db:5432/optuna?sslpassword=s3cret", "postgresql://u@db/optuna?PassWord=s3cret"):
        with pytest.raises(CxrtuneError, match="holds a password") as refused:
            check_storage_url(url)
        assert "s3cret" not in str(refused.value)
    with pytest.raises(CxrtuneError, match="not a database URL"):
        check_storage_url("postgresql://u@db:abc/optuna")
    check_storage_url("postgresql://u@db:5432/optuna?sslmode=verify-full")
