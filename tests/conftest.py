"""Shared fixtures: a real S3 server on 127.0.0.1, phantom data, the real-data folder."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest_plugins = ["tests.coverage_floor"]  # the inner loop's coverage floor per package


def cli(*args, env=None, timeout=420, check=True) -> subprocess.CompletedProcess:
    """``cxrtune ARGS`` in a subprocess, as a user runs it; asserts success unless ``check=False``."""
    try:
        r = subprocess.run([sys.executable, "-m", "cxrtune.cli", *args], capture_output=True, text=True,
                           env={**os.environ, **(env or {})}, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # say what the command was doing, not only that it ran long
        out, err = (b.decode(errors="replace") if isinstance(b, bytes) else (b or "") for b in (exc.stdout, exc.stderr))
        raise AssertionError(f"cxrtune {' '.join(map(str, args))} ran past {timeout} s\nstdout: ...{out[-3000:]}"
                             f"\nstderr: ...{err[-3000:]}") from None
    if check:
        assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r

def cli_in_process(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """``cxrtune ARGS`` through :func:`cxrtune.cli.main` in this process: the command's own parser
    and handlers, without a new interpreter's 6-8 s of imports (most of the suite's CLI calls).
    stdout, stderr and cxrtune's warnings are captured as the command prints them; asserts success
    unless ``check=False``. Tests of the process itself (exit status, no traceback, logs) use :func:`cli`."""
    import contextlib
    import io
    import logging

    from cxrtune.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)  # what the command's logging.basicConfig would print
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("cxrtune")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                (contextlib.chdir(cwd) if cwd else contextlib.nullcontext()):
            try:
                code = main([str(a) for a in args])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        logger.removeHandler(handler)
    r = subprocess.CompletedProcess([str(a) for a in args], code, out.getvalue(), err.getvalue())
    if check:
        assert code == 0, (r.stdout[-3000:], r.stderr[-3000:])
    return r


# Keep every Ray process of the tests on 127.0.0.1. Without this, Ray on Linux resolves "localhost"
# to the machine's outbound address (e.g. 192.0.2.2) and listens on all interfaces; this switch
# (named for macOS/Windows, where it is the default) makes it use the loopback address only.
# Set before anything imports ray; subprocesses (the CLI, `ray start`) inherit it.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Ray refuses to write on a disk over 95 % full (RAY_local_fs_capacity_threshold; 1 - free/size),
# and so does the sweep's check before it starts (cxrtune.cluster). On a large disk shared with
# other work, as CI's is, that is under 12.6 GB free of 252 GB: room to spare for the suite, which
# writes about 3 GiB (README), yet every sweep test would be refused. 0.99 still refuses a disk
# about to fill. The tests of the limit itself set their own value.
os.environ.setdefault("RAY_local_fs_capacity_threshold", "0.99")


STUDY_KEY = "study-key-for-the-tests-0123456789"  # a pseudonym key (>= 16 characters); never a real one


@pytest.fixture
def study_key(monkeypatch) -> bytes:
    """The study's pseudonym key in ``$CXRTUNE_PSEUDONYM_KEY``, as the importers of local files need it."""
    monkeypatch.setenv("CXRTUNE_PSEUDONYM_KEY", STUDY_KEY)
    return STUDY_KEY.encode()


def shared_data() -> Path:
    """``$CXRTUNE_SHARED_DATA`` or ``../shared/data`` beside the project."""
    return Path(os.environ.get("CXRTUNE_SHARED_DATA") or ROOT.parent / "shared" / "data")


def need_shared(sub: str) -> Path:
    path = shared_data() / sub
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set CXRTUNE_SHARED_DATA to the shared data folder)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_session_logs() -> Path:
    """The log folder of the newest local Ray session (what ``/tmp/ray/session_latest`` names when it
    is intact). Found by name, not through that link: Ray does not replace the link once its target
    is deleted (a /tmp clean-up), and an empty glob would let every no-secret-in-the-logs check pass
    without reading a log."""
    sessions = sorted(Path("/tmp/ray").glob("session_2*"))  # session_YYYY-MM-DD_HH-MM-SS_...: sorts by start
    assert sessions, "no Ray session under /tmp/ray"
    logs = sessions[-1] / "logs"
    assert any(f.is_file() for f in logs.rglob("*")), f"no log files in {logs}"
    return logs


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server over real HTTP on 127.0.0.1; boto3 and pyarrow talk to it unpatched."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "CXRTUNE_S3_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", CXRTUNE_S3_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def postgres():
    """A temporary PostgreSQL cluster from Debian's package, on 127.0.0.1 and a free port, with
    password authentication only: ``(URL without the password, canary password)``. Skips with
    the reason where the package is missing or the server cannot start."""
    import glob
    import secrets
    import shutil
    import tempfile

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    bin_dir = Path(found[-1]).parent
    if not (bin_dir / "initdb").exists():
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package; .ci/run installs it)")
    password = "canary" + secrets.token_hex(12)
    root = Path(tempfile.mkdtemp(prefix="cxrtune-pg-"))
    # initdb refuses to run as root: run the server as Debian's postgres user then
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    (root / "pw").write_text(password)
    if as_owner:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    (root / "pw").chmod(0o600)
    port = free_port()
    steps = [[*as_owner, str(bin_dir / "initdb"), "-D", str(root / "data"), "-U", "cxrtune", f"--pwfile={root / 'pw'}",
              "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
             [*as_owner, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "-t", "60",
              "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off", "start"]]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            shutil.rmtree(root, ignore_errors=True)
            pytest.skip(f"PostgreSQL could not start: {(done.stderr or done.stdout).strip()[-300:]}")
    (root / "pw").unlink()
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=port, user="cxrtune", password=password, dbname="postgres",
                         autocommit=True) as conn:  # CREATE DATABASE runs outside a transaction
        conn.execute("CREATE DATABASE optuna")
    try:
        yield f"postgresql://cxrtune@127.0.0.1:{port}/optuna", password
    finally:
        subprocess.run([*as_owner, str(bin_dir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def bucket(s3_server, request):
    """A fresh bucket per test, named after it."""
    from cxrtune import storage

    name = "t-" + "".join(c for c in request.node.name.lower() if c.isalnum())[:40]
    storage.s3_client().create_bucket(Bucket=name)  # as a site's administrator does: cxrtune creates none
    return name


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    from cxrtune.data.phantom import write_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    write_phantoms(out, 24, size=128, seed=0)
    return out


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CXRTUNE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def phantom_bundle(phantom_dir, tmp_path_factory) -> Path:
    """A scorer bundle trained on the phantoms (64 px; Stage I 6 epochs, Stage II 2)."""
    from cxrtune.data import manifest
    from cxrtune.model.artifacts import make_bundle
    from cxrtune.model.train import TrainConfig, train

    work = tmp_path_factory.mktemp("bundle")
    df = manifest.load_manifest(str(phantom_dir / "manifest.parquet"))
    base = {"model": {"arch": "FPN", "encoder": "resnet18"}, "size": 64, "batch_size": 4, "epochs": 2, "lr": 0.003}
    # Stage I must find the phantoms' lungs, or the plausibility check refuses every record: at
    # batch 4 and 2 epochs it marked the whole image (validation Dice 0.30); this reaches ~0.9
    train(TrainConfig.from_dict({**base, "task": "lung", "batch_size": 2, "lr": 0.01, "epochs": 6}), df, str(work / "lung"))
    train(TrainConfig.from_dict({**base, "task": "disease"}), df, str(work / "disease"))
    make_bundle(str(work / "lung"), str(work / "disease"), str(work / "bundle"))
    return work / "bundle"


def bundle_with_blind_lungs(src: Path, out: Path, **changes) -> Path:
    """A new bundle made from ``src`` whose lung model sees nothing (its last segmentation-head
    bias at -1e4), published as any bundle is (hashes, bundle.json last): the no-lungs path.
    ``changes``: other bundle.json fields (e.g. ``audits``)."""
    import io
    from dataclasses import replace

    import torch

    from cxrtune.model.artifacts import bundle_files, publish_bundle, read_bundle_file, read_bundle_meta

    meta = read_bundle_meta(str(src))
    contents = {f: read_bundle_file(str(src), f, meta) for f in bundle_files(meta) if not f.endswith(".onnx")}
    state = torch.load(io.BytesIO(contents["lung.pt"]), weights_only=True)
    bias = [k for k in state if k.startswith("segmentation_head") and k.endswith("bias")][-1]
    state[bias] = torch.full_like(state[bias], -1e4)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    contents["lung.pt"] = buffer.getvalue()
    publish_bundle(str(out), replace(meta, name=out.name, onnx={}, **changes), contents)  # no export of other weights
    return out


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1, valid for a day: a client trusts the certificate
    file itself (``verify=CERT``)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def shipped_cpu_config(tmp_path: Path, bundle: Path) -> tuple[Path, int]:
    """serve/config.cpu.yaml with only the bundle and a free port changed, written to ``tmp_path``:
    what the tests deploy through Serve's own config path."""
    import yaml

    cfg = yaml.safe_load((ROOT / "serve" / "config.cpu.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    cfg["applications"][0]["args"]["bundle"] = str(bundle)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, port


def ctrl_c_reaches_it() -> None:
    """In a served child before it starts: SIGINT handled by default. A test run in the background
    (CI without job control) ignores SIGINT, and a child inherits that: Ctrl-C would never stop
    it, and each test would wait out its 90 s before killing it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_until_ready(base_url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240, verify=None) -> None:
    """Poll ``base_url/readyz`` until the app answers 200, failing with the tail of ``log`` when
    ``proc`` exits first or ``timeout_s`` passes (``verify``: the CA file for HTTPS)."""
    import requests

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            if requests.get(f"{base_url}/readyz", timeout=5, verify=verify).status_code == 200:
                return
        except requests.RequestException:  # proxy not up yet, or the app still deploying
            pass
        time.sleep(1)
    raise AssertionError(log.read_text()[-3000:])


def stop_with_ctrl_c(proc: subprocess.Popen, timeout_s: float = 90) -> None:
    """Ctrl-C a served child and wait for it; kill it and fail when it does not stop in time."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"Ctrl-C did not stop it within {timeout_s:.0f} s") from None
