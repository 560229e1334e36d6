"""The two stages: ``LungStage`` (Stage I) and ``DiseaseStage`` (opacity + normal/disease), and
their deployments ``Stage1`` and ``Stage2``.

Each loads its network from the bundle once per replica and answers through ``@serve.batch``
(batch size and wait configurable), channels_last on every device, bf16 autocast and fractional
GPUs per replica on a GPU. They run only the networks (:meth:`~cxrtune.scoring.scorer.Scorer.forward`);
the ingress does everything around them. With ``stages_in_ingress`` the ingress makes the two
classes itself and calls them in its own process (no Stage deployments).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import numpy as np
import torch
from ray import serve
from ray.serve import metrics

from ..errors import CxrtuneError
from ..model.artifacts import bundle_hash
from ..scoring.scorer import load_bundle
from .settings import ServeSettings, check_pinned

log = logging.getLogger("ray.serve.cxrtune")  # under ray.serve: lands in the replica's Serve log

BATCH_BUCKETS = [1.0, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]


class Stage:
    """Shared by both stages: one stage's network, run on the lean inputs the ingress prepared.

    Every item names the bundle it is for (URI and content hash): the ingress that made it
    decides, so one request never mixes the stages of two bundles, even while ``serve deploy``
    replaces one bundle with another (old and new ingress replicas then both have live stage
    replicas that answer them). A replica keeps its own bundle loaded and loads another on first
    use (the two newest stay loaded)."""
    stage = ""
    KEEP = 2
    # the subclass's @serve.batch method: (bundle URI, bundle hash, lean input) -> (hash, runtime, output)
    run: Callable[[tuple[str, str, np.ndarray]], Awaitable[tuple[str, str, object]]]

    def __init__(self, settings: dict):
        self.batch_sizes = metrics.Histogram("cxrtune_batch_size", description="images per batch a stage ran",
                                             boundaries=BATCH_BUCKETS, tag_keys=("stage",))
        self.batch_sizes.set_default_tags({"stage": self.stage})
        self.s = ServeSettings(**settings)
        if self.s.threads:
            torch.set_num_threads(self.s.threads)  # ONNX Runtime sessions take the same count
        self.scorers: dict = {}  # bundle hash -> Scorer (insertion order: oldest first)
        self.loading = asyncio.Lock()
        self.own_hash = self._load(self.s.bundle)
        run = self.run
        if hasattr(run, "set_max_batch_size"):  # the config's batching, not the decorator's
            run.set_max_batch_size(self.s.max_batch_size)
        if hasattr(run, "set_batch_wait_timeout_s"):
            run.set_batch_wait_timeout_s(self.s.batch_wait_timeout_s)

    def _load(self, uri: str, expected: str | None = None) -> str:
        digest = bundle_hash(uri)
        if expected is None:  # this replica's own bundle: the config may pin its content
            check_pinned(self.s, digest)
        if expected and digest != expected:
            raise CxrtuneError(f"the bundle at {uri} changed after it was deployed (hash {digest[:12]}, "
                               f"expected {expected[:12]}); deploy it again")
        # another bundle (a rolling update's) may lack this replica's pinned export: auto for it
        runtime = self.s.runtime if expected is None else "auto"
        self.scorers[digest] = load_bundle(uri, device=self.s.device, batch_size=self.s.max_batch_size,
                                           stages=(self.stage,), runtime=runtime)
        keep = {digest, getattr(self, "own_hash", digest)}  # never drop this replica's own bundle
        while len(self.scorers) > max(self.KEEP, len(keep)):
            del self.scorers[next(k for k in self.scorers if k not in keep)]
        return digest

    async def _scorer(self, uri: str, digest: str):
        if digest not in self.scorers:
            async with self.loading:
                if digest not in self.scorers:
                    log.info("%s: loading bundle %s for a request", self.stage, digest[:12])
                    await asyncio.to_thread(self._load, uri, digest)
        return self.scorers[digest]

    async def _loaded(self, uri: str, digest: str):
        """The scorer of the bundle a request names, or None (logged) when this replica cannot load
        it: changed since it was deployed, failing its hashes, unreadable. The ingress answers that
        request with a retriable 503, never a 500, and ``/readyz`` says not ready."""
        try:
            return await self._scorer(uri, digest)
        except Exception as exc:  # noqa: BLE001 - whatever stops a load is that request's 503
            log.error("%s: cannot load bundle %s (%s)", self.stage, digest[:12], exc)
            return None

    async def ready(self, uri: str, digest: str) -> bool:
        """Whether this replica serves the bundle ``(uri, digest)`` (loading it if needed)."""
        return await self._loaded(uri, digest) is not None

    async def _forward(self, items: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, object]]:
        """``(bundle URI, bundle hash, lean uint8 input)`` -> ``(bundle hash, runtime, output)``;
        ``("", "", None)`` for the items of a bundle this replica cannot load."""
        self.batch_sizes.observe(len(items))
        out: list = [None] * len(items)
        for digest in dict.fromkeys(d for _, d, _ in items):  # one forward per bundle in the batch
            idx = [i for i, (_, d, _) in enumerate(items) if d == digest]
            scorer = await self._loaded(items[idx[0]][0], digest)
            if scorer is None:
                for i in idx:
                    out[i] = ("", "", None)
                continue
            results = await asyncio.to_thread(scorer.forward, self.stage, [items[i][2] for i in idx])
            loaded = scorer.models.get("bundle_hash")  # hashed from the files when they were loaded
            for i, r in zip(idx, results):
                out[i] = (loaded, scorer.runtime, r)
        return out

    async def info(self) -> dict:
        own = self.scorers.get(self.own_hash)
        return {"bundle_hash": self.own_hash, "loaded": list(self.scorers), "runtime": own.runtime if own else None}


# Ray's @serve.batch keeps one queue per decorated function, not per instance: one process holds at
# most one instance of each class (a Stage replica, or an ingress with stages_in_ingress)
class LungStage(Stage):
    """Lung segmentation: the lean uint8 image -> uint8 lung probabilities at its shape."""
    stage = "lung"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, items: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, object]]:
        return await self._forward(items)


class DiseaseStage(Stage):
    """Opacity segmentation + classification: the lung ROI, uint8 -> (uint8 opacity probabilities
    at its shape, p(disease))."""
    stage = "disease"

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run(self, items: list[tuple[str, str, np.ndarray]]) -> list[tuple[str, str, object]]:
        return await self._forward(items)


Stage1 = serve.deployment(name="Stage1", max_ongoing_requests=64)(LungStage)
Stage2 = serve.deployment(name="Stage2", max_ongoing_requests=64)(DiseaseStage)
