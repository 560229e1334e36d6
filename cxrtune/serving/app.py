"""The Ray Serve application: an ingress (:mod:`.ingress`) composing a Stage I and a Stage II
deployment (:mod:`.stages`), or running both stages itself (``stages_in_ingress``), configured
by :class:`~.settings.ServeSettings`.

``build_app(args)`` is the application builder that ``serve run`` / ``serve deploy`` import
(``import_path: cxrtune.serving.app:build_app`` in serve/config.yaml); ``cxrtune serve`` and
``cxrtune deploy`` run it through :mod:`.deploy`.
"""


import torch

# No postponed annotations here: Serve validates the config's `args` against build_app's annotation only
# when it is the class itself (tests/test_serve_api.py).
from pydantic import ValidationError

from ..errors import CxrtuneError
from ..model.artifacts import read_bundle_meta
from ..scoring.onnx_runtime import ONNX_RUNTIMES
from ..scoring.scorer import choose_runtime
from .ingress import Ingress
from .settings import ServeSettings
from .stages import Stage1, Stage2


def build_app(args: ServeSettings):
    """The application builder that ``serve run`` / ``serve deploy`` import (``import_path:
    cxrtune.serving.app:build_app``): one typed argument, the config's ``args``."""
    return application(args)


def application(settings: ServeSettings | dict, deployments: dict[str, dict] | None = None):
    """The scorer app. ``deployments`` (name -> options) applies a config's per-deployment
    settings when the app is run in-process (``cxrtune serve``, tests); ``serve run CONFIG``
    applies them itself."""
    try:
        settings = settings if isinstance(settings, ServeSettings) else ServeSettings(**(settings or {}))
    except ValidationError as exc:
        raise CxrtuneError(f"bad Serve args: {exc}") from None

    if settings.stages_in_ingress and (stray := sorted(set(deployments or {}) - {"Ingress"})):
        raise CxrtuneError(f"the config has options for {', '.join(stray)}, but stages_in_ingress runs both stages "
                           "in the Ingress deployment: list the Ingress only (`serve run` refuses them too)")
    meta = read_bundle_meta(settings.bundle)  # fail here, plainly, rather than in three replicas
    if settings.runtime in ONNX_RUNTIMES:  # the scorer's own check, on the CPU these runtimes need
        try:
            choose_runtime(settings.runtime, torch.device(settings.device or "cpu"), meta)
        except CxrtuneError as exc:
            raise CxrtuneError(f"runtime {settings.runtime} with bundle {settings.bundle}: {exc}") from None
    plain = settings.model_dump()
    opts = {k: {o: v for o, v in d.items() if o != "name"} for k, d in (deployments or {}).items()}
    ingress = Ingress.options(**opts.get("Ingress", {}))  # type: ignore[attr-defined]
    if settings.stages_in_ingress:  # the ingress makes both stages itself
        return ingress.bind(None, None, plain)
    # Serve's deployment decorator makes Deployment objects, which its stubs do not say
    stage1 = Stage1.options(**opts.get("Stage1", {})).bind(plain)  # type: ignore[attr-defined]
    stage2 = Stage2.options(**opts.get("Stage2", {})).bind(plain)  # type: ignore[attr-defined]
    return ingress.bind(stage1, stage2, plain)
