"""The export stage logs and registers a real MLflow model, and `mlflow models serve` serves it.

A tiny stand-in classifier is exported into a temporary SQLite store (the real stage, the real
registry), then the real `mlflow models serve -m models:/NAME/VERSION --env-manager local`
runs as a subprocess; two texts POSTed to /invocations must come back labelled exactly as the
local torch predictor labels them. The server is always stopped, its whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.unit.test_export import LABELS, ROOT, make_classifier, make_project

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 240  # imports of torch + transformers + mlflow on a loaded 2-core machine
TEXTS = ["the movie was great good fine", "the film was awful bad poor w3 w4"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def wait_for_ping(url: str, server: subprocess.Popen, log: Path, path: str = "/ping") -> None:
    """Until GET url+path answers 200 (a server that exits, or stays silent too long, fails the test)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"{server.args[0]} exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + path, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"no {path} answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def stop(server: subprocess.Popen) -> None:
    """SIGTERM the server's process group (uvicorn runs as a child), SIGKILL if it lingers."""
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)


def test_registered_export_is_served_by_mlflow(tmp_path, tracking_uri, monkeypatch, capsys):
    root = make_project(tmp_path / "project", make_classifier(tmp_path / "classifier"), ROOT)
    monkeypatch.chdir(root)
    from stages.export import main

    main()
    out = capsys.readouterr().out
    assert "export: registered lmpipe-classifier version 1 (models:/lmpipe-classifier/1)" in out

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    version = client.get_model_version("lmpipe-classifier", "1")
    run = client.get_run(version.run_id)
    assert run.data.tags["lmpipe.stage"] == "export" and run.data.tags["lmpipe.registered_version"] == "1"
    assert run.info.status == "FINISHED"
    model_id = run.data.tags["lmpipe.model_uri"].removeprefix("models:/")
    assert version.source == f"models:/{model_id}"
    assert client.get_logged_model(model_id).experiment_id == run.info.experiment_id

    from lmpipe.inference.predictor import Predictor

    expected = Predictor(root / "models/export", "torch", threads=1).predict(TEXTS)
    assert sorted(expected["label"]) == sorted(LABELS)  # one text of each class

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    bin_dir = str(Path(sys.executable).parent)  # `mlflow models serve` execs `uvicorn` from PATH
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking_uri,
        "HF_HUB_OFFLINE": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    command = [
        str(Path(bin_dir) / "mlflow"),
        "models",
        "serve",
        "-m",
        "models:/lmpipe-classifier/1",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with open(log, "wb") as sink:
        server = subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for_ping(url, server, log)
        records = post(url + "/invocations", {"dataframe_records": [{"text": t} for t in TEXTS]})
        split = post(url + "/invocations", {"dataframe_split": {"columns": ["text"], "data": [[t] for t in TEXTS]}})
        inputs = post(url + "/invocations", {"inputs": TEXTS})
    finally:
        stop(server)
    assert server.returncode is not None
    for answer in (records, split, inputs):
        predictions = answer["predictions"]
        assert len(predictions) == 2
        assert [p["label"] for p in predictions] == expected["label"].tolist()
        for p, (_, row) in zip(predictions, expected.iterrows()):
            assert set(p) == {"label", "score", "prob_negative", "prob_positive"}
            assert abs(p["prob_positive"] - row["prob_positive"]) < 1e-5
            assert abs(p["prob_negative"] + p["prob_positive"] - 1) < 1e-6
