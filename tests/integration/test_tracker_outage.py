"""A tracking server that dies mid-run loses nothing: the stage journals the rest, `lmpipe sync` sends it once.

A real `mlflow server` (SQLite backend, proxied artifacts) on 127.0.0.1 takes the first metrics of a
stage run, is SIGKILLed, and the run goes on: its later metrics, an artifact and its end are
journaled to `.lmpipe/spool`. The server is restarted on the same store; `lmpipe sync` completes the
run, and a second sync changes nothing; the run stays nested under its pipeline run, which ends with
it. The server is always stopped, its whole process group.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_serve import free_port, stop

pytestmark = pytest.mark.integration

START_TIMEOUT_S = 240  # mlflow's imports on a loaded 2-core machine


def start_server(tmp_path: Path, port: int, log: Path) -> subprocess.Popen:
    bin_dir = str(Path(sys.executable).parent)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],  # fmt: skip
        cwd=tmp_path,
        stdout=open(log, "ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"},
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    stop(server)
    pytest.fail(f"no /health answer within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


def test_server_killed_mid_run_then_restarted_gets_every_metric_once(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    from lmpipe.cli.main import main as lmpipe
    from lmpipe.core.tracking import stage_run

    port, log = free_port(), tmp_path / "server.log"
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a dead server fails at once
    (tmp_path / "notes.txt").write_text("written while the server was down\n")
    server = start_server(tmp_path, port, log)
    try:
        with stage_run("pretrain") as tracker:
            run_id = tracker.run_id
            for step in range(3):
                tracker.log_metrics({"loss": float(10 - step)}, step=step)
            tracker.flush()  # sent live
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
            with pytest.warns(UserWarning, match=f"journaling the rest of run {run_id}"):
                for step in range(3, 6):
                    tracker.log_metrics({"loss": float(10 - step)}, step=step)
                tracker.flush()
            tracker.log_artifact(tmp_path / "notes.txt", "notes")
        assert len(list((tmp_path / ".lmpipe" / "spool").glob("*.jsonl"))) == 1

        server = start_server(tmp_path, port, log)
        client = MlflowClient(uri)
        assert client.get_run(run_id).info.status == "RUNNING"  # what the store knew when it died
        assert lmpipe(["sync"]) == 0 and "sent 1 spooled run(s)" in capsys.readouterr().out
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        parent = client.get_run(run.data.tags["mlflow.parentRunId"])  # the pipeline run made at the stage's open
        assert parent.data.tags["lmpipe.kind"] == "pipeline" and parent.info.status == "FINISHED"
        assert parent.info.end_time == run.info.end_time  # the replayed end reached it too
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(s, float(10 - s)) for s in range(6)]
        assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/notes.txt"]
        assert list((tmp_path / ".lmpipe" / "spool").iterdir()) == []

        assert lmpipe(["sync"]) == 0 and "nothing to sync" in capsys.readouterr().out
        assert len(client.get_metric_history(run_id, "loss")) == 6
        assert len(client.search_runs([run.info.experiment_id])) == 2  # the stage run and its pipeline run
    finally:
        stop(server)
