"""`lmpipe serve` in-process: limits, token, masking, micro-batching and the ASGI app's answers.

The app is driven by raw ASGI messages with a stand-in engine (the real model server runs in
tests/integration/test_lmpipe_serve.py); the metrics are parsed by the Prometheus parser.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest

from lmpipe.cli import serve as serve_cli
from lmpipe.monitor.drift import STATISTICS, DriftWindow, Reference
from lmpipe.serve.app import ServeConfig, create_app
from lmpipe.serve.batcher import MicroBatcher
from lmpipe.serve.engine import Prediction, model_info
from lmpipe.serve.guard import BearerToken, Limits, Refused, check_length_header, mask, parse_texts

LIMITS = Limits(max_body_bytes=200_001, max_texts=3, max_chars=50)


# --------------------------------------------------------------------------- guard
@pytest.mark.parametrize(
    "body, status, reason",
    [
        (b"x" * 200_002, 413, "body of 200002 bytes > limit 200001"),
        (b"{not json", 400, "body is not JSON (Expecting property name"),
        (b"\xff\xfe", 400, "body is not UTF-8"),
        (b"[" * 100 + b"]" * 100, 422, "expected a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "body is nested too deeply"),
        (b'["a"]', 422, 'expected a JSON object {"texts": [...]}, got a list'),
        (b'{"texts": []}', 422, "texts: empty list"),
        (b'{"texts": "a"}', 422, "texts: expected a list of strings, got a string"),
        (b'{"texts": ["a", 3]}', 422, "texts[1]: expected a string, got a number"),
        (b'{"text": null}', 422, "text: expected a string, got null"),
        (b'{"texts": ["a", " "]}', 422, "texts[1]: empty text"),
        (b'{"texts": ["a", "b", "c", "d"]}', 413, "texts: 4 texts > limit 3 per request"),
        (json.dumps({"text": "y" * 51}).encode(), 422, "text: 51 characters > limit 50"),
        (b'{"text": "a", "texts": ["b"]}', 422, "give exactly one of 'text'"),
        (b'{"inputs": ["a"]}', 422, "unknown key 'inputs'"),
    ],
)
def test_bad_bodies_are_refused_with_one_line(body, status, reason):
    with pytest.raises(Refused) as refused:
        parse_texts(body, LIMITS)
    assert refused.value.status == status
    assert refused.value.reason.startswith(reason), refused.value.reason
    assert "\n" not in refused.value.reason


def test_deep_nesting_is_a_400_not_a_crash():
    body = b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(Refused) as refused:
        parse_texts(body, Limits(max_body_bytes=1 << 20))
    assert refused.value.status in (400, 422)


def test_good_bodies():
    assert parse_texts(b'{"text": "fine film"}', LIMITS) == ["fine film"]
    assert parse_texts(json.dumps({"texts": ["a", "b\u00e9"]}).encode(), LIMITS) == ["a", "b\u00e9"]


def test_length_header():
    check_length_header(None, LIMITS.max_body_bytes)
    check_length_header("200001", LIMITS.max_body_bytes)
    with pytest.raises(Refused, match="body of 200002 bytes"):
        check_length_header("200002", LIMITS.max_body_bytes)
    with pytest.raises(Refused, match="not a number"):
        check_length_header("-1", LIMITS.max_body_bytes)


def test_bearer_token_constant_time_and_non_ascii():
    open_door = BearerToken(None)
    open_door.check(None)
    assert not open_door.required
    token = BearerToken("s3cr\u00e9t")
    assert token.required
    token.check("Bearer " + "s3cr\u00e9t".encode().decode("latin-1"))  # what Starlette hands over
    for header in (None, "", "Basic abc", "Bearer", "Bearer wrong", "Bearer \u2603"):
        with pytest.raises(Refused) as refused:
            token.check(header)
        assert refused.value.status == 401 and refused.value.kind == "unauthorized"


def test_mask_hides_emails_and_digits():
    text = "Mail jane.doe+x@mail.example.co.uk or call 555-0199,\nticket 42"
    assert mask(text) == "Mail <email> or call ###-####, ticket ##"
    assert len(mask("word " * 100)) == 200


# --------------------------------------------------------------------------- batcher
def run_async(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_a_model_call_and_keep_their_rows():
    calls = []

    def model(texts):
        calls.append(list(texts))
        return [t.upper() for t in texts]

    async def main():
        batcher = MicroBatcher(model, lambda r, a, b: r[a:b], max_batch=8, wait_ms=50)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([f"t{i}", f"u{i}"]) for i in range(6)))
        await batcher.stop()
        return results

    results = run_async(main())
    assert results == [[f"T{i}", f"U{i}"] for i in range(6)]
    assert [len(c) for c in calls] == [8, 4]  # 4 requests of 2 fill a batch of 8; the rest follow


def test_max_batch_one_serves_one_request_at_a_time_in_order():
    calls = []

    async def main():
        batcher = MicroBatcher(lambda t: calls.append(list(t)) or t, lambda r, a, b: r[a:b], max_batch=1, wait_ms=50)
        await batcher.start()
        await asyncio.gather(*(batcher.submit([f"t{i}"]) for i in range(4)))
        big = await batcher.submit(["a", "b", "c"])  # bigger than max_batch: runs alone, never split
        await batcher.stop()
        return big

    assert run_async(main()) == ["a", "b", "c"]
    assert calls == [["t0"], ["t1"], ["t2"], ["t3"], ["a", "b", "c"]]


def test_a_lone_client_never_waits_but_concurrent_traffic_does():
    calls = []

    async def main():
        # a 10-minute window: a lone request that waited would hit the 60 s timeout below
        batcher = MicroBatcher(lambda t: calls.append(list(t)) or t, lambda r, a, b: r[a:b], max_batch=2, wait_ms=6e5)
        await batcher.start()
        await asyncio.wait_for(batcher.submit(["lone"]), timeout=60)
        await asyncio.wait_for(batcher.submit(["lone again"]), timeout=60)
        await asyncio.gather(batcher.submit(["x"]), batcher.submit(["y"]))  # a shared batch: traffic is concurrent
        first = asyncio.ensure_future(batcher.submit(["a"]))
        await asyncio.sleep(0.05)  # "b" arrives while "a" waits for company
        both = await asyncio.wait_for(asyncio.gather(first, batcher.submit(["b"])), timeout=60)
        await batcher.stop()
        return both

    assert run_async(main()) == [["a"], ["b"]]
    assert calls == [["lone"], ["lone again"], ["x", "y"], ["a", "b"]]


def test_a_request_that_does_not_fit_opens_the_next_batch():
    calls = []

    async def main():
        batcher = MicroBatcher(lambda t: calls.append(list(t)) or t, lambda r, a, b: r[a:b], max_batch=4, wait_ms=50)
        await batcher.start()
        await asyncio.gather(batcher.submit(["a", "b", "c"]), batcher.submit(["d", "e"]), batcher.submit(["f"]))
        await batcher.stop()

    run_async(main())
    assert calls == [["a", "b", "c"], ["d", "e", "f"]]


def test_full_queue_is_503_and_a_failed_batch_fails_only_its_requests():
    state = {"fail": True}

    def model(texts):
        if state.pop("fail", False):
            raise RuntimeError("boom")
        return texts

    async def main():
        batcher = MicroBatcher(model, lambda r, a, b: r[a:b], max_batch=4, wait_ms=0, max_queue=2)
        await batcher.start()
        with pytest.raises(Refused) as refused:
            await batcher.submit(["a", "b", "c"])
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.submit(["a"])
        ok = await batcher.submit(["b"])  # the server keeps serving
        await batcher.stop()
        return refused.value, ok

    refused, ok = run_async(main())
    assert refused.status == 503 and refused.kind == "overloaded" and ok == ["b"]


# --------------------------------------------------------------------------- the app
class StandInEngine:
    """Labels by text: 'good' -> pos; length = words; no model."""

    labels = ["neg", "pos"]
    backend = "stand-in"
    statistics = STATISTICS

    def __init__(self, fail_on: str = "crash") -> None:
        cfg = SimpleNamespace(length_bins=4, window=60, min_window=30, psi_alert=0.25)
        rng = np.random.default_rng(0)
        self.reference_lengths = rng.integers(1, 10, size=200)
        raw = [[1] * int(n) for n in self.reference_lengths]
        labels = rng.integers(0, 2, size=200)
        self.window = DriftWindow(Reference.build(raw, 0, labels, self.labels, labels, cfg))
        self.fail_on = fail_on
        self.info = {"name": "stand-in", "dvc_md5": "abc.dir", "git_revision": "0" * 40, "backend": self.backend}

    def predict(self, texts):
        if self.fail_on in texts:
            raise RuntimeError("secret internal detail")
        pos = np.asarray([0.9 if "good" in t else 0.2 for t in texts])
        lengths = np.asarray([len(t.split()) for t in texts], dtype=float)
        return Prediction(np.stack([1 - pos, pos], axis=1), lengths, np.zeros(len(texts)))


async def call(app, method, path, body=b"", headers=()):
    """One HTTP request through the ASGI app: (status, headers, body)."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode("latin-1")) for k, v in headers],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 5000),
        "root_path": "",
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict((k.decode(), v.decode()) for k, v in start["headers"]), payload


def serve(coro_fn, monkeypatch, token=None, engine=None, **config):
    if token:
        monkeypatch.setenv("LMPIPE_SERVE_TOKEN", token)
    else:
        monkeypatch.delenv("LMPIPE_SERVE_TOKEN", raising=False)
    app = create_app(ServeConfig(limits=LIMITS, **config), engine=engine or StandInEngine())

    async def main():
        service = app.state.service
        await service.batcher.start()
        try:
            return await coro_fn(app)
        finally:
            await service.batcher.stop()

    return asyncio.run(main())


def test_predict_health_model_and_metrics(monkeypatch):
    async def session(app):
        ok = await call(app, "POST", "/predict", json.dumps({"texts": ["good film", "bad film"]}).encode())
        one = await call(app, "POST", "/predict", b'{"text": "good"}')
        health = await call(app, "GET", "/health")
        model = await call(app, "GET", "/model")
        bad = await call(app, "POST", "/predict", b'{"texts": []}')
        missing = await call(app, "GET", "/nothing")
        metrics = await call(app, "GET", "/metrics")
        return ok, one, health, model, bad, missing, metrics

    ok, one, health, model, bad, missing, metrics = serve(session, monkeypatch)
    assert ok[0] == 200
    rows = json.loads(ok[2])["predictions"]
    assert [r["label"] for r in rows] == ["pos", "neg"]
    assert rows[0]["score"] == pytest.approx(0.9) and rows[1]["probs"] == pytest.approx({"neg": 0.8, "pos": 0.2})
    assert json.loads(one[2])["predictions"][0]["label"] == "pos"
    assert health[0] == 200 and json.loads(health[2])["status"] == "ok"
    assert model[0] == 200 and json.loads(model[2])["dvc_md5"] == "abc.dir"
    assert json.loads(model[2])["drift"] == {"window": 60, "min_window": 30, "psi_alert": 0.25}
    assert bad[0] == 422 and json.loads(bad[2]) == {"error": "texts: empty list"}
    assert missing[0] == 404 and json.loads(missing[2]) == {"error": "Not Found"}
    assert metrics[0] == 200 and metrics[1]["content-type"].startswith("text/plain")
    found = {(n, tuple(sorted(lab.items()))): v for n, lab, v in serve_cli.samples(metrics[2].decode())}
    assert found[("lmpipe_requests_total", (("endpoint", "/predict"), ("status", "200")))] == 2
    assert found[("lmpipe_requests_total", (("endpoint", "/predict"), ("status", "422")))] == 1
    assert found[("lmpipe_requests_total", (("endpoint", "other"), ("status", "404")))] == 1
    assert found[("lmpipe_request_errors_total", (("kind", "bad_request"),))] == 1
    assert found[("lmpipe_texts_total", ())] == 3
    assert found[("lmpipe_predictions_total", (("label", "pos"),))] == 2
    assert found[("lmpipe_batch_size_count", ())] == 2


def test_token_guards_everything_but_health(monkeypatch):
    async def session(app):
        auth = [("Authorization", "Bearer t0ken")]
        return {
            "predict": await call(app, "POST", "/predict", b'{"text": "good"}'),
            "wrong": await call(app, "POST", "/predict", b'{"text": "good"}', [("Authorization", "Bearer nope")]),
            "metrics": await call(app, "GET", "/metrics"),
            "model": await call(app, "GET", "/model"),
            "health": await call(app, "GET", "/health"),
            "authorized": await call(app, "POST", "/predict", b'{"text": "good"}', auth),
            "metrics_ok": await call(app, "GET", "/metrics", headers=auth),
        }

    answers = serve(session, monkeypatch, token="t0ken")
    for name in ("predict", "wrong", "metrics", "model"):
        status, headers, body = answers[name]
        assert status == 401 and headers["www-authenticate"] == "Bearer", name
        assert "error" in json.loads(body)
    assert answers["health"][0] == 200 and answers["authorized"][0] == 200
    text = answers["metrics_ok"][2].decode()
    assert 'lmpipe_request_errors_total{kind="unauthorized"} 4.0' in text


def test_internal_error_is_a_500_without_details_and_serving_goes_on(monkeypatch, caplog):
    async def session(app):
        crash = await call(app, "POST", "/predict", b'{"texts": ["good", "crash"]}')
        after = await call(app, "POST", "/predict", b'{"text": "good"}')
        return crash, after

    with caplog.at_level(logging.ERROR, logger="lmpipe.serve"):
        crash, after = serve(session, monkeypatch)
    assert crash[0] == 500
    reason = json.loads(crash[2])["error"]
    assert reason.startswith("internal error (ref ") and "secret" not in reason and "Traceback" not in reason
    assert after[0] == 200
    assert "secret internal detail" in caplog.text  # the traceback went to the log, with the reference
    assert reason.split("ref ")[1][:12] in caplog.text


def test_inputs_logged_only_when_asked_and_masked(monkeypatch, caplog):
    body = b'{"text": "good call me at 555 1234"}'

    async def session(app):
        return await call(app, "POST", "/predict", body)

    with caplog.at_level(logging.INFO, logger="lmpipe.serve"):
        serve(session, monkeypatch)
    assert "555" not in caplog.text and "input:" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmpipe.serve"):
        serve(session, monkeypatch, log_inputs=True)
    assert "input: good call me at ### ####" in caplog.text and "555" not in caplog.text


def test_drift_alert_is_logged_once_and_counted(monkeypatch, caplog):
    engine = StandInEngine()
    # in-domain: the reference's own lengths, half of them "good"
    texts = [" ".join(["good" if i % 2 else "bad"] * int(n)) for i, n in enumerate(engine.reference_lengths[:45])]

    async def session(app):
        for i in range(0, 45, 3):
            await call(app, "POST", "/predict", json.dumps({"texts": texts[i : i + 3]}).encode())
        quiet = (await call(app, "GET", "/metrics"))[2].decode()
        for _ in range(20):  # 20-word texts: longer than any reference text
            await call(app, "POST", "/predict", json.dumps({"texts": ["w " * 20] * 3}).encode())
        return quiet, (await call(app, "GET", "/metrics"))[2].decode()

    with caplog.at_level(logging.WARNING, logger="lmpipe.serve"):
        quiet, loud = serve(session, monkeypatch, engine=engine)
    assert 'lmpipe_drift_alerts_total{statistic="length"} 0.0' in quiet, caplog.text
    assert "lmpipe_drift_window_texts 45.0" in quiet
    assert 'lmpipe_drift_alerts_total{statistic="length"} 1.0' in loud
    assert 'lmpipe_drift_alert{statistic="length"} 1.0' in loud
    assert caplog.text.count("drift alert: length PSI") == 1
    report = serve_cli.summarize(loud)
    assert "length   PSI" in report and "ALERT" in report and "predict    35 requests (200: 35)" in report, report


# --------------------------------------------------------------------------- monitor, lineage
def test_histogram_quantile_interpolates_like_prometheus():
    buckets = [(0.1, 50.0), (0.2, 90.0), (0.5, 100.0), (float("inf"), 100.0)]
    assert serve_cli.quantile(buckets, 0.5) == pytest.approx(0.1)
    assert serve_cli.quantile(buckets, 0.7) == pytest.approx(0.15)
    assert serve_cli.quantile(buckets, 0.95) == pytest.approx(0.35)
    assert np.isnan(serve_cli.quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5))


def test_model_info_hashes_params_and_folder(tmp_path):
    lineage = {
        "git": {"rev": "a" * 40, "dirty": False},
        "model": {"name": "scratch", "labels": ["neg", "pos"]},
        "stages": {"pretrain": {"params": {"lr": 1}}},
        "export": {"params": {"quantize": True}},
        "numerics": {"mode": "portable"},
    }
    (tmp_path / "lineage.json").write_text(json.dumps(lineage))
    first = model_info(tmp_path)
    assert first["git_revision"] == "a" * 40 and first["dvc_md5"].endswith(".dir")
    lineage["stages"]["pretrain"]["params"]["lr"] = 2
    (tmp_path / "lineage.json").write_text(json.dumps(lineage))
    second = model_info(tmp_path)
    assert second["params_sha256"] != first["params_sha256"] and second["dvc_md5"] != first["dvc_md5"]


def test_serve_flags_are_checked_before_loading(capsys):
    from lmpipe.cli.main import main

    assert main(["serve", "--max-batch", "0"]) == 2
    assert "--max-batch must be >= 1 (got 0)" in capsys.readouterr().err
    assert main(["serve", "--batch-wait-ms", "-1"]) == 2
