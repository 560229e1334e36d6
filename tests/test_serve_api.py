"""The HTTP API's contract without starting Ray: the app an ingress replica builds for itself
(its routes bound to it, its error handlers reporting to it) and the OpenAPI document."""

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from ray import cloudpickle

from cxrtune import serving
from cxrtune.scoring.record import ScoreRecord
from cxrtune.serving.ingress import Ingress


def replica_app(refused: list):
    # the deployment's class as a replica gets it: Serve pickles it by value (it is not importable
    # by name), so string annotations would lose the names they refer to
    cls = cloudpickle.loads(cloudpickle.dumps(Ingress.func_or_class))
    ingress = object.__new__(cls)
    ingress.viewer = (Path(serving.__file__).parent / "viewer.html").read_text()
    ingress._audit = lambda request_id, code, data, record: refused.append((code, request_id))
    return cls.__serve_build_asgi_app__(ingress)


def test_routes_take_the_request_and_only_overlay_as_a_query():
    spec = replica_app([]).openapi()
    op = spec["paths"]["/v1/score"]["post"]
    assert [p["name"] for p in op["parameters"]] == ["overlay"]  # `request` is the Request, not a query
    record = spec["components"]["schemas"]["ScoreRecord"]  # the name the API always had
    assert set(ScoreRecord.model_fields) | {"request_id", "timings_ms", "overlay_png_base64"} == set(record["properties"])
    assert {"models", "input", "request_id", "status", "score"} <= set(record["required"])


def test_dicom_results_are_negotiated_and_documented():
    """Accept: multipart/related; type="application/dicom" asks for the SR and SEG (as a DICOMweb
    client asks for instances); OpenAPI lists that answer and the 406 for a non-DICOM input."""
    import email.parser

    from cxrtune.pacs.results import DICOM_RESULTS, multipart_related
    from cxrtune.serving.api import wants_dicom

    assert wants_dicom(DICOM_RESULTS) and wants_dicom('application/json, Multipart/Related; type="application/dicom"')
    assert not wants_dicom("application/json") and not wants_dicom("image/png, */*")
    assert wants_dicom('multipart/related; type=application/dicom; q=0.5, application/json')
    assert not wants_dicom('multipart/related; type="application/dicom"; q=0, application/json')  # refused
    assert not wants_dicom('multipart/related; type="image/jpeg"')  # a rendered frame is not the results
    body = multipart_related([b"DICM-one\r\n--x", b"two"], "b0undary")
    message = email.parser.BytesParser().parsebytes(
        f'Content-Type: {DICOM_RESULTS}; boundary="b0undary"\r\n\r\n'.encode() + body)
    assert [(p.get_content_type(), p.get_payload(decode=True)) for p in message.get_payload()] == \
        [("application/dicom", b"DICM-one\r\n--x"), ("application/dicom", b"two")]
    op = replica_app([]).openapi()["paths"]["/v1/score"]["post"]
    assert DICOM_RESULTS in op["responses"]["200"]["content"] and "406" in op["responses"]


def test_serve_validates_the_config_args_against_the_settings():
    """Serve checks a config's `args` against build_app's annotation only when it is the class."""
    import inspect

    from cxrtune.serving.app import build_app
    from cxrtune.serving.settings import ServeSettings

    assert inspect.signature(build_app).parameters["args"].annotation is ServeSettings


def test_stages_in_the_ingress_refuse_options_for_stage_deployments(tmp_path):
    """With stages_in_ingress the app has no Stage deployments: options for them are refused, as
    `serve run` refuses them, before any bundle is read."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.app import application

    with pytest.raises(CxrtuneError, match="options for Stage1, Stage2, but stages_in_ingress"):
        application({"bundle": str(tmp_path / "none"), "stages_in_ingress": True},
                    {"Ingress": {}, "Stage1": {}, "Stage2": {}})


def test_errors_outside_the_routes_have_the_one_shape_and_reach_the_ingress():
    refused = []
    client = TestClient(replica_app(refused))
    r = client.get("/nowhere", headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "request_id": "abc-1"}
    r = client.post("/v1/score?overlay=maybe", content=b"x")
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request: query.overlay")
    assert [code for code, _ in refused] == [404, 422] and refused[0][1] == "abc-1"


def test_api_keys_rotate_compare_on_bytes_and_are_never_quoted():
    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.auth import ApiKeys

    old, new = "o" * 20, "n" * 24
    keys = ApiKeys.parse(f"old:{old}, new:{new}")
    assert keys.match(old) == "old" and keys.match(new) == "new"
    assert keys.match(None) is None and keys.match("") is None and keys.match(new[:-1]) is None
    assert keys.match("\xff" * 24) is None  # a non-ASCII header (latin-1 from Starlette): no error
    single = ApiKeys.parse(new)
    assert single.match(new) == single.keys[0][0] and single.keys[0][0].startswith("key-") and new not in single.keys[0][0]
    assert not ApiKeys.parse("")
    for bad, why in ((f"a:{old},b:{new},c:{new}x", "at most 2"), ("short-key", "shorter than 16"),
                     (f"a:{old},a:{new}", "share an id"), ("s3cretprefix:short", "API key 1 of 1 is shorter than 16")):
        with pytest.raises(CxrtuneError, match=why) as err:
            ApiKeys.parse(bad)
        message = str(err.value)
        assert not [part for part in (old, new, "short-key", "s3cretprefix") if part in message]
    colon = "Pr1vate#Part:" + "r" * 20  # a key holding a colon, not ID:KEY: the whole of it is the key
    assert ApiKeys.parse(colon).match(colon) and not ApiKeys.parse(colon).match("r" * 20)


def test_failed_key_checks_are_limited_per_client():
    from cxrtune.serving.auth import FailedAttempts

    attempts = FailedAttempts(limit=3, window_s=10)
    for t in (0.0, 1.0, 2.0):
        assert attempts.blocked_for("10.0.0.9", now=t) == 0
        attempts.failed("10.0.0.9", now=t)
    assert attempts.blocked_for("10.0.0.9", now=3.0) == pytest.approx(7.0)
    assert attempts.blocked_for("10.0.0.8", now=3.0) == 0  # another client is not held up
    assert attempts.blocked_for("10.0.0.9", now=10.5) == 0  # the first failure left the window
    # clients that fail once and never come back are forgotten once their failures leave the window
    for i in range(1000):
        attempts.failed(f"10.1.{i >> 8}.{i & 255}", now=20.0)
    assert len(attempts._seen) >= 1000
    assert attempts.blocked_for("10.0.0.7", now=40.0) == 0 and len(attempts._seen) == 0


def test_models_shown_to_clients_carry_no_location():
    from cxrtune.serving.auth import without_locations

    models = {"bundle": "v2", "bundle_hash": "abc", "lung": "FPN/resnet18@256", "zone_threshold": 0.1,
              "zone_calibration": {"threshold": 0.1, "manifest": "s3://hospital/data/brixia.parquet", "n": 80},
              "stage_audits": {"lung": {"run": "/home/dr_smith/runs/lung"}},
              "model_card": {"data": ["C:\\\\exports\\\\x.csv", "covid-qu-ex"], "intended_use": "research"}}
    shown = without_locations(models)
    assert shown == {"bundle": "v2", "bundle_hash": "abc", "lung": "FPN/resnet18@256", "zone_threshold": 0.1,
                     "zone_calibration": {"threshold": 0.1, "n": 80}, "stage_audits": {"lung": {}},
                     "model_card": {"data": ["covid-qu-ex"], "intended_use": "research"}}


def test_security_headers_on_every_response_and_no_cdn_pages():
    """CSP (the viewer's own inline script and style only, by hash; nothing from another host; no
    framing), nosniff, no-store on /v1 answers; FastAPI's /docs and /redoc (CDN scripts) are off."""
    import base64
    import hashlib

    client = TestClient(replica_app([]))
    page = client.get("/")
    csp = page.headers["content-security-policy"]
    script = page.text.split("<script>", 1)[1].split("</script>", 1)[0]
    assert "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'" in csp
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp and "http" not in csp
    assert page.headers["x-content-type-options"] == "nosniff" and "cache-control" not in page.headers
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.headers["cache-control"] == "no-store"
    assert missing.headers["content-security-policy"] == csp
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").status_code == 200


def test_secure_by_default_an_ingress_without_a_key_refuses_to_start(monkeypatch, capsys):
    """auth: key (the default) and no key: the ingress refuses to start, before it reads anything;
    auth: none is the explicit way to serve without one. `cxrtune serve` on 127.0.0.1 makes a key
    and prints it once; on any other host it refuses."""
    import inspect

    from cxrtune.errors import CxrtuneError
    from cxrtune.serving import ingress as ingress_module
    from cxrtune.serving.auth import require_keys
    from cxrtune.serving.deploy import local_key
    from cxrtune.serving.settings import ServeSettings

    with pytest.raises(CxrtuneError, match="no API key: set CXRTUNE_API_KEY"):
        require_keys(ServeSettings(bundle="b"), "")
    with pytest.raises(CxrtuneError, match="auth: none, but CXRTUNE_API_KEY holds a key"):
        require_keys(ServeSettings(bundle="b", auth="none"), "k" * 20)
    assert not require_keys(ServeSettings(bundle="b", auth="none"), "")
    assert require_keys(ServeSettings(bundle="b"), "k" * 20).match("k" * 20)
    # the ingress checks its keys first, before it reads the bundle or makes any metric
    source = inspect.getsource(ingress_module)
    init = source[source.index("    def __init__(self, stage1"):].splitlines()
    assert "ServeSettings(" in init[1] and "require_keys(" in init[2]

    monkeypatch.setenv("CXRTUNE_API_KEY", "k" * 20)

    assert local_key({"bundle": "b"}, "0.0.0.0") is None  # a key is set: nothing to do
    monkeypatch.delenv("CXRTUNE_API_KEY")
    with pytest.raises(CxrtuneError, match="no API key for a scorer listening on 0.0.0.0"):
        local_key({"bundle": "b"}, "0.0.0.0")
    assert local_key({"bundle": "b", "auth": "none"}, "0.0.0.0") is None
    made = local_key({"bundle": "b"}, "127.0.0.1")
    assert made and len(made) >= 16 and os.environ["CXRTUNE_API_KEY"] == made
    assert capsys.readouterr().out.count(made) == 1


class _Method:
    """``handle.method.remote(*args)`` of a Serve handle, answered by ``fn``."""
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)
        return call()


class FakeStage:
    """A stage deployment's handle whose replica can (or cannot) load the bundle asked for."""
    deployment_name = "Stage1"

    def __init__(self, loads: bool):
        self.ready = _Method(lambda uri, digest: loads)
        self.run = _Method(lambda item: (item[1], "torch", "output") if loads else ("", "", None))


def test_a_stage_that_cannot_load_the_bundle_is_a_retriable_503_and_not_ready():
    """A replica that cannot load the bundle a request names (changed after deployment, failing its
    hashes) answers without a result: the request gets a 503 with Retry-After, never a 500, and
    /readyz says not ready until every stage serves the bundle."""
    import asyncio

    import numpy as np

    from cxrtune.serving.api import RequestError
    from cxrtune.serving.settings import ServeSettings

    cls = cloudpickle.loads(cloudpickle.dumps(Ingress.func_or_class))
    ingress = object.__new__(cls)
    ingress.s, ingress.bundle_hash = ServeSettings(bundle="/bundles/v2", retry_after_s=7), "abc123"
    ingress.stage1, ingress.stage2 = FakeStage(True), FakeStage(True)
    assert asyncio.run(ingress._stage(ingress.stage1, np.zeros((8, 8), np.uint8))) == ("abc123", "torch", "output")
    assert asyncio.run(ingress.readyz()) == {"status": "ready"}
    ingress.stage2 = FakeStage(False)
    with pytest.raises(RequestError) as err:
        asyncio.run(ingress._stage(ingress.stage2, np.zeros((8, 8), np.uint8)))
    assert (err.value.status, err.value.retry_after) == (503, 7) and "cannot load" in err.value.detail
    assert err.value.response("r-1").headers["Retry-After"] == "7"
    not_ready = asyncio.run(ingress.readyz())
    assert not_ready.status_code == 503 and b"cannot load the deployed bundle" in not_ready.body


def test_a_stage_replica_reports_a_bundle_it_cannot_load_instead_of_raising(tmp_path, caplog):
    import asyncio
    import types

    import numpy as np

    from cxrtune.serving.settings import ServeSettings
    from cxrtune.serving.stages import Stage1

    stage = object.__new__(Stage1.func_or_class)
    stage.s, stage.scorers, stage.loading = ServeSettings(bundle=str(tmp_path / "live")), {}, asyncio.Lock()
    stage.batch_sizes = types.SimpleNamespace(observe=lambda n: None)
    gone = str(tmp_path / "replaced")  # no bundle there (or one that fails its hashes): the load raises
    assert asyncio.run(stage.ready(gone, "0123456789abcdef")) is False
    items = [(gone, "0123456789abcdef", np.zeros((8, 8), np.uint8))] * 2
    assert asyncio.run(stage._forward(items)) == [("", "", None)] * 2
    assert "cannot load bundle 0123456789ab" in caplog.text


def test_a_pinned_bundle_hash_refuses_other_content():
    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.settings import ServeSettings, check_pinned

    check_pinned(ServeSettings(bundle="s3://b/bundles/v3"), "anything")  # nothing pinned: any content
    pinned = ServeSettings(bundle="s3://b/bundles/v3", bundle_hash="0123456789abcdef")
    check_pinned(pinned, "0123456789abcdef")
    with pytest.raises(CxrtuneError, match="pins bundle_hash 0123456789abcdef"):
        check_pinned(pinned, "fedcba9876543210")
    with pytest.raises(Exception, match="bundle_hsh"):  # a misspelt key is refused, naming it
        ServeSettings(bundle="b", bundle_hsh="0123456789abcdef")


# ----------------------------------------------------------------------------- the upload and scoring budgets
LIMITS = dict(max_file_bytes=2_000_000, max_files=4, max_field_bytes=64 * 1024, max_parts=8, timeout_s=30,
              min_bytes_per_s=1000, grace_s=5)


def _multipart(parts: list[tuple[str, str | None, int]], boundary: str = "b0undary", chunk: int = 256 * 1024):
    """A multipart body made as it is sent, ``(field, filename or None, size)`` per part, and a
    counter of the bytes handed out so far: what a server has read when it refuses."""
    sent = {"bytes": 0}

    async def body():
        for field_name, filename, size in parts:
            name = f'; filename="{filename}"' if filename is not None else ""
            head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"{name}\r\n\r\n'.encode()
            sent["bytes"] += len(head)
            yield head
            left = size
            while left:
                piece = b"x" * min(chunk, left)
                left -= len(piece)
                sent["bytes"] += len(piece)
                yield piece
            sent["bytes"] += 2
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return f"multipart/form-data; boundary={boundary}", body(), sent


def _read(ctype, body, length=None, limits=None):
    import asyncio

    from cxrtune.serving.budgets import UploadBudget, UploadLimits, read_upload

    budget = UploadBudget(10**9)

    async def run():
        with budget.hold() as add:
            return await read_upload(ctype, length, body, UploadLimits(**(limits or LIMITS)), add)
    try:
        return asyncio.run(run())
    finally:
        assert budget.held == 0  # every byte a request held is released when it ends


def test_uploads_are_refused_as_their_bytes_arrive_with_bounded_memory():
    """A file part over its cap, 1,000 x 1 MB text fields, too many small fields and a chunked raw
    body over the cap: each a 413 after reading at most one chunk past the cap, and the memory
    the parser held stays within the cap (no part is read whole, none is spooled to disk)."""
    import tempfile
    import tracemalloc

    from cxrtune.serving.api import RequestError

    ctype, body, _ = _multipart([("file", "a.png", 1_000_000), ("files", "b.png", 900_000)])
    assert [(n, len(d)) for n, d in _read(ctype, body)] == [("a.png", 1_000_000), ("b.png", 900_000)]

    chunk = 256 * 1024
    temporary = set(Path(tempfile.gettempdir()).iterdir())
    cases = {"file part": ([("file", "a.png", 50_000_000)], LIMITS["max_file_bytes"], "a file is over"),
             "1,000 x 1 MB fields": ([(f"f{i}", None, 1_000_000) for i in range(1000)], LIMITS["max_field_bytes"],
                                     "a form field is over"),
             "many fields": ([(f"f{i}", None, 10) for i in range(1000)], 2000, "more than 8 parts")}
    for case, (parts, cap, message) in cases.items():
        ctype, body, sent = _multipart(parts)
        tracemalloc.start()
        with pytest.raises(RequestError) as refused:
            _read(ctype, body)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert refused.value.status == 413 and message in refused.value.detail, case
        assert sent["bytes"] <= cap + chunk + 1024, (case, sent)  # refused as the bytes arrived
        assert peak < 3 * (cap + chunk) + 2_000_000, (case, peak)
    assert set(Path(tempfile.gettempdir()).iterdir()) == temporary  # nothing spooled

    async def raw(n):  # a chunked raw body: no Content-Length to check first
        for _ in range(n):
            yield b"y" * chunk
    with pytest.raises(RequestError, match="upload over the limit") as refused:
        _read("application/octet-stream", raw(100))
    assert refused.value.status == 413
    with pytest.raises(RequestError) as refused:  # a declared length over the whole body's cap: before reading
        _read("application/octet-stream", raw(0), length=str(10**10))
    assert refused.value.status == 413 and "over the limit" in refused.value.detail
    ctype, body, _ = _multipart([("file", "a.png", 10)])
    with pytest.raises(RequestError) as refused:
        _read(ctype.replace("b0undary", "other"), body)  # a body whose boundary never comes
    assert refused.value.status == 400
    ctype, body, _ = _multipart([("note", None, 10)])
    with pytest.raises(RequestError, match="no file field"):
        _read(ctype, body)


def test_the_upload_budget_refuses_past_the_bytes_all_uploads_hold():
    from cxrtune.serving.api import RequestError
    from cxrtune.serving.budgets import UploadBudget

    budget = UploadBudget(1000)
    with budget.hold() as first:
        first(600)
        with budget.hold() as second:
            with pytest.raises(RequestError) as refused:
                second(600)
            assert refused.value.status == 503 and budget.held == 600
            second(400)
            assert budget.held == 1000
        assert budget.held == 600
    assert budget.held == 0


def test_after_an_oversized_body_the_freed_heap_goes_back_to_the_system():
    """The ingress's app has the middleware; it trims once the app has answered a request whose
    body reached ``after_bytes`` (a refusal included), in its own thread, never for a smaller body;
    one trim runs at a time and one more may wait; and the trim returns glibc's freed heap: in a
    process holding 280 MB of freed 100 kB blocks (in the heap, under glibc's mmap threshold), RSS
    falls by most of it."""
    import asyncio
    import platform
    import subprocess
    import sys
    import threading

    from cxrtune.serving.api import RequestError
    from cxrtune.serving.budgets import ReturnFreedHeap

    assert ReturnFreedHeap in [m.cls for m in replica_app([]).user_middleware]
    answered: list[bool] = []
    trimmed: list[tuple[str, bool]] = []
    done = threading.Event()

    def trim():
        trimmed.append((threading.current_thread().name, answered[-1]))
        done.set()

    async def app(scope, receive, send):  # reads the whole body, then refuses it as the ingress would
        answered.append(False)
        while (await receive()).get("more_body"):
            pass
        answered[-1] = True
        raise RequestError(413, "over the limit")

    def request(middleware, sizes):
        messages = iter([{"type": "http.request", "body": b"x" * n, "more_body": i < len(sizes) - 1}
                         for i, n in enumerate(sizes)])

        async def receive():
            return next(messages)
        with pytest.raises(RequestError):
            asyncio.run(middleware({"type": "http"}, receive, None))
    middleware = ReturnFreedHeap(app, after_bytes=1000, trim=trim)
    request(middleware, [400, 599])
    assert not done.wait(0.2) and trimmed == []
    request(middleware, [400, 600])
    assert done.wait(5) and len(trimmed) == 1
    assert trimmed[0][0].startswith("cxrtune-trim") and trimmed[0][1]  # its own thread, after the answer

    gate, calls = threading.Event(), []
    slow = ReturnFreedHeap(app, after_bytes=1000, trim=lambda: (calls.append(1), gate.wait(5)))
    for _ in range(4):  # the first trim runs until the gate opens: one waits, the others add nothing
        request(slow, [2000])
    gate.set()
    slow.pool.shutdown(wait=True)
    assert calls == [1, 1] and slow.scheduled == 0

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    probe = """if True:
        import psutil
        from cxrtune.serving.budgets import return_freed_heap
        kept, freed = [], []
        for i in range(3200):
            (kept if i % 8 == 0 else freed).append(bytes([i % 251]) * 100_000)
        del freed
        before = psutil.Process().memory_info().rss
        return_freed_heap()
        print((before - psutil.Process().memory_info().rss) / 1e6)
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    returned_mb = float(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                       check=True).stdout)
    assert returned_mb > 200, returned_mb


def test_a_trickling_body_is_cut_off():
    """After the grace period a body must keep to the minimum rate: 1 byte every 50 ms against
    1 kB/s after 0.2 s is a 408, long before the 30 s timeout."""
    import asyncio
    import time

    from cxrtune.serving.api import RequestError
    from cxrtune.serving.budgets import UploadLimits, paced

    async def trickle():
        while True:
            await asyncio.sleep(0.05)
            yield b"x"

    async def drain(limits):
        return [c async for c in paced(trickle(), limits)]

    start = time.monotonic()
    with pytest.raises(RequestError, match="upload too slow") as slow:
        asyncio.run(drain(UploadLimits(**{**LIMITS, "grace_s": 0.2})))
    assert slow.value.status == 408 and time.monotonic() - start < 5

    async def fast():
        for _ in range(3):
            yield b"x" * 10_000
    assert asyncio.run(asyncio.wait_for(_collect(paced(fast(), UploadLimits(**LIMITS))), 5)) == [b"x" * 10_000] * 3


async def _collect(chunks):
    return [c async for c in chunks]


def test_a_request_cancelled_mid_thread_keeps_its_slots_until_the_thread_ends():
    """A client that hangs up cancels its request (Serve cancels the task), but a decode already
    running in a thread goes on: its slots stay counted until it returns, so a new request is
    refused meanwhile, and the slots come back after it."""
    import asyncio
    import threading

    from cxrtune.serving.api import RequestError
    from cxrtune.serving.budgets import ScoringBudget

    budget = ScoringBudget(limit=1, retry_after_s=1)
    release, started = threading.Event(), threading.Event()

    def decode():
        started.set()
        release.wait(10)
        return "decoded"

    async def request():
        with budget.admitted() as ticket:
            return await ticket.run(decode)

    async def scenario():
        task = asyncio.create_task(request())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # the client hung up
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.in_flight == 1  # the thread still runs: still counted
        with pytest.raises(RequestError) as full:
            with budget.admitted():
                pass
        assert full.value.status == 503
        release.set()
        for _ in range(200):
            if budget.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.in_flight == 0
        assert await request() == "decoded"  # the slot is free again

    asyncio.run(scenario())


def test_a_request_cancelled_while_queued_for_a_thread_frees_its_slots_at_once():
    """A request whose thread has not started yet (the pool is busy) is cancelled with its client:
    its slots come back without waiting for the busy thread, which keeps its own; a request that
    ends normally leaves nothing counted."""
    import asyncio
    import threading

    from cxrtune.serving.budgets import ScoringBudget

    budget = ScoringBudget(limit=2, retry_after_s=1, threads=1)
    release, started = threading.Event(), threading.Event()
    queued_ran = threading.Event()

    def busy():
        started.set()
        release.wait(10)
        return "busy"

    async def request(fn):
        with budget.admitted() as ticket:
            return await ticket.run(fn)

    async def scenario():
        first = asyncio.create_task(request(busy))
        while not started.is_set():
            await asyncio.sleep(0.01)
        second = asyncio.create_task(request(queued_ran.set))  # waits for the one thread
        await asyncio.sleep(0.05)
        assert budget.in_flight == 2
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        assert budget.in_flight == 1  # at once: only the running thread is still counted
        release.set()
        assert await first == "busy"
        assert budget.in_flight == 0  # a normal end: counted down when its request ends
        assert not queued_ran.is_set()  # the cancelled call never ran

    asyncio.run(scenario())


def test_the_api_key_can_come_from_a_file_only_its_owner_reads(tmp_path, monkeypatch):
    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.auth import key_text, require_keys
    from cxrtune.serving.settings import ServeSettings

    monkeypatch.setenv("CXRTUNE_API_KEY", "from-the-environment-0123")
    path = tmp_path / "keys"
    path.write_text("a:" + "k" * 20 + ",b:" + "n" * 20 + "\n")
    path.chmod(0o644)
    settings = ServeSettings(bundle="b", api_key_file=str(path))
    with pytest.raises(CxrtuneError, match="may be read by others") as refused:
        key_text(settings)
    assert "k" * 20 not in str(refused.value)
    path.chmod(0o600)
    keys = require_keys(settings, key_text(settings))  # the file, not the variable
    assert keys.match("n" * 20) == "b" and keys.match("from-the-environment-0123") is None
    with pytest.raises(CxrtuneError, match="cannot read the API key file"):
        key_text(ServeSettings(bundle="b", api_key_file=str(tmp_path / "missing")))
    assert key_text(ServeSettings(bundle="b")) == "from-the-environment-0123"


def test_cxrtune_serve_passes_every_http_option_and_refuses_unknown_ones():
    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.deploy import http_options

    options = http_options({"host": "127.0.0.1", "port": 8443, "request_timeout_s": 30, "keep_alive_timeout_s": 5,
                            "ssl_certfile": "/etc/cxrtune/cert.pem", "ssl_keyfile": "/etc/cxrtune/key.pem"})
    assert (options.ssl_certfile, options.ssl_keyfile, options.request_timeout_s, options.keep_alive_timeout_s) == \
        ("/etc/cxrtune/cert.pem", "/etc/cxrtune/key.pem", 30, 5)
    with pytest.raises(CxrtuneError, match="unknown http_options in the Serve config: ssl_certfle"):
        http_options({"ssl_certfle": "/etc/cxrtune/cert.pem"})  # Serve would serve plain HTTP
    with pytest.raises(CxrtuneError, match="ssl_keyfile and ssl_certfile must be provided together"):
        http_options({"ssl_certfile": "/etc/cxrtune/cert.pem"})


def test_deploy_gives_replicas_the_storage_endpoint_but_never_a_secret(monkeypatch):
    """The deployed config (which the dashboard shows) carries the S3 endpoint this machine uses,
    and never the API key or a credential."""
    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.deploy import STORAGE_ENV, replica_runtime_env
    from cxrtune.serving.settings import ServeSettings

    for name in STORAGE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CXRTUNE_S3_ENDPOINT_URL", "https://s3.hospital.example")
    monkeypatch.setenv("CXRTUNE_API_KEY", "k" * 20)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "canary-secret")
    settings = ServeSettings(bundle="s3://b/bundles/v1", api_key_file="/etc/cxrtune/api-keys")
    env = replica_runtime_env({"pip": ["x"]}, settings)
    assert env == {"pip": ["x"], "env_vars": {"CXRTUNE_S3_ENDPOINT_URL": "https://s3.hospital.example"}}
    given = replica_runtime_env({"env_vars": {"CXRTUNE_S3_ENDPOINT_URL": "https://other"}}, settings)
    assert given["env_vars"]["CXRTUNE_S3_ENDPOINT_URL"] == "https://other"  # the config's own wins
    for secret in ("CXRTUNE_API_KEY", "AWS_SECRET_ACCESS_KEY"):
        with pytest.raises(CxrtuneError, match=f"runtime_env holds {secret}") as refused:
            replica_runtime_env({"env_vars": {secret: "v" * 20}}, settings)
        assert "v" * 20 not in str(refused.value)


def test_deploy_refuses_a_config_that_shows_a_secret_to_the_dashboard(tmp_path):
    """Every runtime_env of the deployed config (the app's and each deployment's) and the TLS key's
    password are shown by the dashboard: a secret there is refused before anything is deployed."""
    import yaml

    from cxrtune.errors import CxrtuneError
    from cxrtune.serving.deploy import deploy_config

    base = yaml.safe_load((Path(__file__).parent.parent / "serve" / "config.cpu.yaml").read_text())
    base["applications"][0]["args"]["bundle"] = str(tmp_path / "no-bundle")
    leaky_deployment = yaml.safe_load(yaml.safe_dump(base))
    leaky_deployment["applications"][0]["deployments"][0]["ray_actor_options"]["runtime_env"] = {
        "env_vars": {"CXRTUNE_API_KEY": "k" * 20}}
    key_password = yaml.safe_load(yaml.safe_dump(base))
    key_password["http_options"]["ssl_keyfile_password"] = "p" * 12
    for cfg, message in ((leaky_deployment, "runtime_env holds CXRTUNE_API_KEY"),
                         (key_password, "ssl_keyfile_password would be shown")):
        path = tmp_path / "serve.yaml"
        path.write_text(yaml.safe_dump(cfg))
        with pytest.raises(CxrtuneError, match=message) as refused:
            deploy_config(str(path), address="http://127.0.0.1:9")  # nothing listens there: never reached
        assert "k" * 20 not in str(refused.value) and "p" * 12 not in str(refused.value)
