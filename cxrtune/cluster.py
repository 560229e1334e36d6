"""Joining or starting Ray, and what it can place. Tune and Serve both wait forever, warning now
and then, for work that asks for more CPUs or GPUs than the cluster has. A fixed local instance
never grows, so cxrtune says so at once instead. A cluster that may autoscale is not checked: one
named by ``RAY_ADDRESS``, or a cluster-launcher node (``ray up`` leaves ``~/ray_bootstrap_config.yaml``)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from .config_files import load_yaml
from .errors import CxrtuneError

# What trials and replicas on other nodes need from the driver's environment, passed through the
# job's runtime_env. Never credentials: each node signs S3 requests with its own (instance profile,
# or its own environment), and the W&B key stays with the driver, whose callback does the logging.
WORKER_ENV = ("CXRTUNE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION",
              "AWS_DEFAULT_REGION", "CXRTUNE_S3_RETRIES", "WANDB_MODE", "WANDB_PROJECT", "WANDB_ENTITY")
SECRETS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "WANDB_API_KEY",
           "CXRTUNE_OPTUNA_PASSWORD")


def worker_env(extra: dict | None = None) -> dict:
    """The environment variables the job's workers get (``WORKER_ENV`` that are set, plus
    ``extra``); a secret is refused even if asked for."""
    env = {k: os.environ[k] for k in WORKER_ENV if os.environ.get(k)}
    env.update({k: str(v) for k, v in (extra or {}).items() if v is not None})
    leaked = sorted(set(env) & set(SECRETS))
    if leaked:
        raise CxrtuneError(f"{', '.join(leaked)} must not travel in a runtime_env; each node uses its own")
    return env


def keep_secrets_out_of_trial_runtime_envs() -> None:
    """Ray Tune copies the driver's AWS credentials into every trial actor's runtime_env
    (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``), and Ray's runtime-env agent logs a
    runtime_env in full. cxrtune's trials use their own node's credentials (the instance role; on
    one machine, the environment Ray's processes inherited), so that list loses every name in
    :data:`SECRETS`. Written by hand: Ray has no option for it; a Ray that renames the list fails
    here by name."""
    from ray.tune.execution import class_cache

    try:
        names = class_cache.ENV_VARS_TO_PROPAGATE
    except AttributeError:
        raise CxrtuneError("Ray Tune no longer has class_cache.ENV_VARS_TO_PROPAGATE: update "
                           "cxrtune.cluster.keep_secrets_out_of_trial_runtime_envs") from None
    class_cache.ENV_VARS_TO_PROPAGATE = set(names) - set(SECRETS)


INLINE_MESSAGE_BYTES = 128 * 2**20


def ray_system_config() -> dict:
    """The Ray settings of every instance cxrtune starts: a reply or call of up to
    ``INLINE_MESSAGE_BYTES`` travels inline, not through the shared object store, so upload bodies
    that Serve's proxy hands to the ingress neither stay mapped there nor spill to disk
    (docs/serving.md, back-pressure). cluster.yaml's head command sets the same; a test keeps the
    two equal. A new dict each time: ``ray.init`` adds its own keys to the one it is given."""
    return {"max_direct_call_object_size": INLINE_MESSAGE_BYTES, "task_rpc_inlined_bytes_limit": INLINE_MESSAGE_BYTES}


def start_ray(**init_args):
    """A new local Ray instance with :func:`ray_system_config`, never a running one: what cxrtune's
    own commands start, and what the serving benches and tests start to measure them.

    Returns:
        ``ray.init``'s context (its ``address_info`` names the session's folder)."""
    import ray

    return ray.init(address="local", _system_config=ray_system_config(), **init_args)


def init_ray(num_cpus: int | None = None, dashboard: bool = False, env: dict | None = None,
             new_instance: bool = False) -> None:
    """Join the cluster that ``RAY_ADDRESS`` or ``ray start`` names, else start a local instance
    (:func:`start_ray`, with ``num_cpus``, default all). ``dashboard`` keeps Ray's dashboard on
    (``cxrtune serve``: ``serve status`` and ``serve deploy`` talk to it). Every task and actor of
    the job gets :func:`worker_env` (with ``env``) through the runtime_env, so a trial on another
    node reads the same S3 endpoint and logs to the same W&B project as the driver.
    ``new_instance`` starts a local instance even where ``ray start`` runs one, so that its
    processes inherit this process's environment (``cxrtune serve --haproxy``). A cluster that
    is joined keeps its own settings (cluster.yaml's head sets :func:`ray_system_config`'s)."""
    import ray

    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        raise CxrtuneError("Ray no longer has ray._private.services.canonicalize_bootstrap_address: update "
                           "cxrtune.cluster.init_ray") from None
    if ray.is_initialized():
        return
    vars_ = worker_env(env)
    runtime_env = {"env_vars": vars_} if vars_ else None
    named = os.environ.get("RAY_ADDRESS", "")
    # a cluster RAY_ADDRESS names, or the instance `ray start` runs here (what ray.init(address=None)
    # finds; Ray annotates the argument as str, its docstring and ray.init pass None)
    joins = not new_instance and (named not in ("", "local") or (
        not named and canonicalize_bootstrap_address(None) is not None))  # type: ignore[arg-type]
    if joins:
        ray.init(runtime_env=runtime_env)
    else:
        start_ray(num_cpus=num_cpus, include_dashboard=dashboard, runtime_env=runtime_env)


CLUSTER_CONFIG_ENV = "CXRTUNE_CLUSTER_CONFIG"


def cluster_config_path() -> Path | None:
    """The autoscaling config of the cluster this driver runs on: ``$CXRTUNE_CLUSTER_CONFIG``, or
    the one the cluster launcher leaves on the head (``~/ray_bootstrap_config.yaml``)."""
    for candidate in (os.environ.get(CLUSTER_CONFIG_ENV), "~/ray_bootstrap_config.yaml"):
        if candidate and Path(candidate).expanduser().is_file():
            return Path(candidate).expanduser()
    return None


def _per_node(resources: dict, cpus: float, gpus: float) -> int:
    fits = []
    if gpus:
        fits.append(int(resources.get("GPU", 0) // gpus))
    if cpus:
        fits.append(int(resources.get("CPU", 0) // cpus))
    return min(fits) if fits else 0


def max_parallel(cpus: float, gpus: float) -> int:
    """How many units of (cpus, gpus) the cluster could run at once at its maximum size.

    From the autoscaling config when there is one (each node type's ``resources`` x its
    ``max_workers``; a type whose resources the cloud fills in at launch counts one unit per
    node), else from what the running instance has. At least 1."""
    path = cluster_config_path()
    if path is None:
        import ray

        return max(1, _per_node(ray.cluster_resources(), cpus, gpus))

    config = load_yaml(str(path))
    head = config.get("head_node_type")
    budget = int(config.get("max_workers", 10 ** 6))
    total = 0
    for name, node in (config.get("available_node_types") or {}).items():
        resources = node.get("resources") or {}
        units = _per_node(resources, cpus, gpus) if resources else 1
        count = 1 if name == head else min(int(node.get("max_workers", 0)), budget)
        total += units * count
    return max(1, total)


def may_autoscale() -> bool:
    """Whether more nodes may join (a cluster address is set, or this is a ``ray up`` head): then a
    trial that does not fit the present nodes may wait for them instead of being refused."""
    return bool(os.environ.get("RAY_ADDRESS")) or Path("~/ray_bootstrap_config.yaml").expanduser().exists()


def check_fits(what: str, cpus: float, gpus: float, hint: str) -> None:
    """Raise if one unit of ``what`` (a trial, a replica) needs more than the running instance has."""
    import ray

    if may_autoscale():
        return
    have = ray.cluster_resources()
    for resource, asked in (("GPU", gpus), ("CPU", cpus)):
        if asked > have.get(resource, 0):
            raise CxrtuneError(f"{what} asks for {asked:g} {resource}s but this Ray instance has "
                               f"{have.get(resource, 0):g}: it could never start. {hint}")


def ray_temp_dir() -> str:
    """Where Ray on this machine keeps its sessions, spilled objects and Tune's staged results, in
    Ray's own order on Linux (``ray._common.utils.get_user_temp_dir``): RAY_TMPDIR, TMPDIR, /tmp."""
    return os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"


def capacity_threshold() -> float:
    """Ray's ``RAY_local_fs_capacity_threshold``: the fraction of a disk in use past which Ray
    calls it full (0.95 unless set)."""
    text = os.environ.get("RAY_local_fs_capacity_threshold", "0.95")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0:  # also NaN
        raise CxrtuneError(f"RAY_local_fs_capacity_threshold={text!r}: give a fraction of the disk, such as 0.95")
    return value


def disk_is_full(free: int, total: int, threshold: float) -> bool:
    """Ray's rule (its file_system_monitor): full when no more than ``1 - threshold`` of the disk is
    free; a threshold of 1 or more turns the check off; a disk of no capacity is full."""
    return threshold < 1 and (total <= 0 or free <= (1 - threshold) * total)


def full_disk(paths: Iterable[str]) -> str | None:
    """The first of ``paths`` (local folders, which need not exist yet) on a disk that Ray calls
    full (:func:`disk_is_full`), said for people; None where all have room. On such a disk Ray
    fails to create objects and trials fail to write their checkpoints, and a sweep then ends with
    no result; Ray says so only in its raylet's log (written by hand: nothing in Ray checks first).
    A disk that cannot be measured is not called full.
    """
    threshold = capacity_threshold()
    for given in paths:
        path = Path(given).resolve()
        try:
            while not path.exists():
                path = path.parent
            usage = shutil.disk_usage(path)
        except OSError:
            continue
        if disk_is_full(usage.free, usage.total, threshold):
            used = 1 - usage.free / usage.total if usage.total > 0 else 1.0
            return (f"{given}: the disk is {used:.1%} full ({usage.free / 2**30:.2f} GiB free of "
                    f"{usage.total / 2**30:.0f} GiB); Ray fails to create objects, and trials to write checkpoints, "
                    f"on a disk over {threshold:.0%} full (RAY_local_fs_capacity_threshold). Free space there first")
    return None
