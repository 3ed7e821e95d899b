"""The tracker: right status on every ending, hashes as tags, never fatal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from lmpipe.core.lineage import dvc_md5
from lmpipe.core.params import load_params
from lmpipe.core.tracking import stage_run


@pytest.fixture
def params(project_root):
    return load_params(project_root / "params.yaml")


def _only_run(uri):
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_finished_run_has_params_metrics_and_hash_tags(tracking_uri, params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.txt").write_text("x")
    with stage_run("tokenize", params, sections=("tokenize",), inputs=("data",), outputs=("data/x.txt",)) as t:
        for step in range(250):  # more than one batch
            t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
    run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED"
    assert run.data.params["tokenize.vocab_size"] == "8000"
    assert "pretrain.optim.lr" not in run.data.params
    assert run.data.tags["lmpipe.stage"] == "tokenize"
    assert run.data.tags["lmpipe.group"] == "exp-1"
    assert run.data.tags["dvc.dep.data"] == dvc_md5(tmp_path / "data")
    assert run.data.tags["dvc.out.data/x.txt"] == dvc_md5(tmp_path / "data" / "x.txt")
    history = MlflowClient(tracking_uri).get_metric_history(run.info.run_id, "loss")
    assert len(history) == 250
    assert run.data.metrics["peak_rss_mb"] > 10 and run.data.metrics["stage_seconds"] >= 0


def test_exception_marks_the_run_failed(tracking_uri, params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError):
        with stage_run("preprocess", params):
            raise ValueError("bad row")
    assert _only_run(tracking_uri).info.status == "FAILED"


def test_sigterm_marks_the_run_killed(tracking_uri, project_root, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(project_root)!r})
        from lmpipe.core.params import load_params
        from lmpipe.core.stage import run
        from lmpipe.core.tracking import stage_run
        def main():
            with stage_run("pretrain", load_params({str(project_root / "params.yaml")!r})):
                print("ready", flush=True)
                time.sleep(60)
        run(main)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert _only_run(tracking_uri).info.status == "KILLED"


def test_unreachable_server_never_stops_the_stage(params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.warns(UserWarning, match="not reachable"):
        with stage_run("baseline", params) as t:
            t.log_metrics({"acc": 1.0})
            t.flush()
            done = True
    assert done and not t.active


def test_only_rank_zero_logs(tracking_uri, params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "1")
    with stage_run("pretrain", params) as t:
        assert not t.active
    assert MlflowClient(tracking_uri).get_experiment_by_name("lmpipe") is None


def _stage_script(project_root, stage):
    return textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(project_root)!r})
        from lmpipe.core.tracking import stage_run
        with stage_run({stage!r}) as tracker:
            tracker.wait_open()  # the run opens in the background: be sure it exists before saying so
            print("ready", flush=True)
            time.sleep(60)
        """
    )


def test_next_stage_closes_the_run_of_a_sigkilled_stage_as_killed(tracking_uri, project_root, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _stage_script(project_root, "pretrain")],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        orphan = _only_run(tracking_uri)
    finally:
        proc.kill()
        proc.stdout.close()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert orphan.data.tags["lmpipe.owner.pid"] == str(proc.pid)
    assert orphan.data.tags["lmpipe.owner.host"] and orphan.data.tags["lmpipe.owner.start"]
    with stage_run("finetune"):
        pass
    client = MlflowClient(tracking_uri)
    old = client.get_run(orphan.info.run_id)
    assert old.info.status == "KILLED" and old.info.end_time
    assert f"owner process {proc.pid}" in old.data.tags["lmpipe.killed_reason"]


def test_runs_of_live_owners_and_other_hosts_stay_running(tracking_uri, tmp_path, monkeypatch):
    from lmpipe.core.tracking import owner_tags

    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lmpipe")
    project = {"lmpipe.project": tmp_path.name}
    mine = client.create_run(exp, tags={**project, **owner_tags()}).info.run_id
    elsewhere = {**owner_tags(), "lmpipe.owner.host": "another-host", "lmpipe.owner.pid": "999999999"}
    other = client.create_run(exp, tags={**project, **elsewhere}).info.run_id
    reused = client.create_run(exp, tags={**project, **owner_tags(), "lmpipe.owner.start": "1"}).info.run_id
    with stage_run("baseline"):
        pass
    assert client.get_run(mine).info.status == "RUNNING"
    assert client.get_run(other).info.status == "RUNNING"
    assert client.get_run(reused).info.status == "KILLED"  # same pid, another start time: a reused pid


def _spooled(tmp_path):
    return sorted((tmp_path / ".lmpipe" / "spool").glob("*.jsonl"))


def test_a_store_down_at_start_loses_nothing_and_one_sync_sends_it_once(params, tmp_path, monkeypatch, capsys):
    from lmpipe.cli.main import main as lmpipe

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens
    (tmp_path / "report.md").write_text("# report\n")
    with pytest.warns(UserWarning, match="not reachable; running untracked, journaled to"):
        with stage_run("baseline", params, sections=("baseline",), outputs=("report.md",)) as t:
            for step in range(3):
                t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            t.log_artifact(tmp_path / "report.md", "reports")
            t.log_dict({"a": 1}, "extra/d.json")
    (tmp_path / "report.md").write_text("changed after the stage\n")  # the spool kept its own copy
    [journal] = _spooled(tmp_path)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert lmpipe(["sync"]) == 0 and "sent 1 spooled run(s)" in capsys.readouterr().out
    assert _spooled(tmp_path) == [] and not journal.with_suffix("").exists()
    run = _only_run(uri)
    assert run.info.status == "FINISHED" and run.info.end_time >= run.info.start_time
    assert run.data.tags["lmpipe.stage"] == "baseline" and run.data.tags["lmpipe.spool_id"] == journal.stem
    assert run.data.params["baseline.max_features"] == str(params.baseline.max_features)
    assert run.data.tags["dvc.out.report.md"] and "stage_seconds" in run.data.metrics
    client = MlflowClient(uri)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    local = client.download_artifacts(run.info.run_id, "reports/report.md", str(tmp_path / "dl"))
    assert open(local).read() == "# report\n"
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["extra", "reports"]

    assert lmpipe(["sync"]) == 0 and "nothing to sync" in capsys.readouterr().out
    _only_run(uri)  # still one run


def test_a_spool_replay_cut_short_and_repeated_makes_no_second_run(params, tmp_path, monkeypatch):
    from lmpipe.core.tracking import sync_spool

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.warns(UserWarning, match="journaled"):
        with stage_run("baseline", params) as t:
            t.log_metrics({"acc": 0.5}, step=1)
    [journal] = _spooled(tmp_path)
    copy = journal.read_bytes()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    first = sync_spool(client, uri, tmp_path)
    journal.write_bytes(copy)  # as if the first replay died before removing its journal
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("evaluate", params):  # the next stage that reaches the store replays it
        pass
    assert _spooled(tmp_path) == []
    runs = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
    assert sorted(r.data.tags["lmpipe.stage"] for r in runs) == ["baseline", "evaluate"]
    assert [r.info.run_id for r in runs if r.data.tags["lmpipe.stage"] == "baseline"] == first


def test_the_body_works_while_the_run_opens_and_what_it_logs_meanwhile_arrives(
    tracking_uri, params, tmp_path, monkeypatch
):
    import threading

    from lmpipe.core import tracking

    monkeypatch.chdir(tmp_path)
    MlflowClient(tracking_uri).search_experiments()  # the store exists: a stage creating it opens first
    gate = threading.Event()
    real_open = tracking._open_run

    def open_when_allowed(*args):
        gate.wait()  # the store "answers" only once the body has logged everything below
        return real_open(*args)

    monkeypatch.setattr(tracking, "_open_run", open_when_allowed)
    (tmp_path / "notes.txt").write_text("as logged\n")
    with stage_run("baseline", params, sections=("baseline",), outputs=("notes.txt",)) as t:
        try:
            assert t.recording and t._run_id is None  # the body runs while the run is not open yet
            for step in range(3):
                t.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            t.flush()
            t.log_artifact(tmp_path / "notes.txt", "notes")
            payload = {"a": [1]}
            t.log_dict(payload, "extra/d.json")
            payload["a"].append(2)  # changed after logging: the run keeps what was logged
            (tmp_path / "notes.txt").write_text("changed before the run opened\n")
            with pytest.warns(UserWarning, match="could not be kept"):
                t.log_artifact(tmp_path / "missing.txt")  # a warning, not the end of the stage
        finally:
            gate.set()  # (also when an assertion above fails: the stage's end waits for the open)
        assert t.run_id is not None and t.active  # both wait for the open
    run = _only_run(tracking_uri)
    assert run.info.status == "FINISHED" and run.data.tags["lmpipe.stage"] == "baseline"
    assert run.data.params["baseline.max_features"] == str(params.baseline.max_features)
    assert run.data.metrics["startup_seconds"] > 0 and "dvc.out.notes.txt" in run.data.tags
    client = MlflowClient(tracking_uri)
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert run.info.start_time <= min(m.timestamp for m in history)  # the run starts with the stage
    notes = client.download_artifacts(run.info.run_id, "notes/notes.txt", str(tmp_path / "dl"))
    assert open(notes).read() == "as logged\n"
    extra = client.download_artifacts(run.info.run_id, "extra/d.json", str(tmp_path / "dl"))
    assert json.loads(open(extra).read()) == {"a": [1]}


def test_only_a_stage_that_creates_the_local_store_waits_for_its_run(tmp_path):
    from lmpipe.core.tracking import _creates_store

    db = tmp_path / "mlflow.db"
    assert _creates_store(f"sqlite:///{db}")  # a kill mid-creation would leave a half-made schema
    db.write_bytes(b"")
    assert not _creates_store(f"sqlite:///{db}")
    assert not _creates_store("http://127.0.0.1:5000")
