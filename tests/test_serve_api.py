"""The HTTP API's contract without starting Ray: the app an ingress replica builds for itself
(its routes bound to it, its error handlers reporting to it) and the OpenAPI document."""

from fastapi.testclient import TestClient
from ray import cloudpickle

from cxrtune.scoring.record import ScoreRecord
from cxrtune.serving.ingress import Ingress


def replica_app(refused: list):
    # the deployment's class as a replica gets it: Serve pickles it by value (it is not importable
    # by name), so string annotations would lose the names they refer to
    cls = cloudpickle.loads(cloudpickle.dumps(Ingress.func_or_class))
    ingress = object.__new__(cls)
    ingress._audit = lambda request_id, code, data, record: refused.append((code, request_id))
    return cls.__serve_build_asgi_app__(ingress)


def test_routes_take_the_request_and_only_overlay_as_a_query():
    spec = replica_app([]).openapi()
    op = spec["paths"]["/v1/score"]["post"]
    assert [p["name"] for p in op["parameters"]] == ["overlay"]  # `request` is the Request, not a query
    record = spec["components"]["schemas"]["ScoreRecord"]  # the name the API always had
    assert set(ScoreRecord.model_fields) | {"request_id", "timings_ms", "overlay_png_base64"} == set(record["properties"])
    assert {"models", "input", "request_id", "status", "score"} <= set(record["required"])


def test_serve_validates_the_config_args_against_the_settings():
    """Serve checks a config's `args` against build_app's annotation only when it is the class."""
    import inspect

    from cxrtune.serving.app import build_app
    from cxrtune.serving.settings import ServeSettings

    assert inspect.signature(build_app).parameters["args"].annotation is ServeSettings


def test_errors_outside_the_routes_have_the_one_shape_and_reach_the_ingress():
    refused = []
    client = TestClient(replica_app(refused))
    r = client.get("/nowhere", headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 404 and r.json() == {"error": "Not Found", "request_id": "abc-1"}
    r = client.post("/v1/score?overlay=maybe", content=b"x")
    assert r.status_code == 422 and r.json()["error"].startswith("invalid request: query.overlay")
    assert [code for code, _ in refused] == [404, 422] and refused[0][1] == "abc-1"
