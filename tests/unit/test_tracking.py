"""The tracker: right status on every ending, hashes as tags, never fatal; stage runs nested per pipeline run."""

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


def _stage_runs(client, experiment="lmpipe"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`lmpipe.kind` = 'stage'")


def _pipeline_runs(client, experiment="lmpipe"):
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], "tags.`lmpipe.kind` = 'pipeline'")


def _only_run(uri):
    runs = _stage_runs(MlflowClient(uri))
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
    runs = _stage_runs(client)
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


def _parent(run):
    return run.data.tags["mlflow.parentRunId"]


def test_stage_runs_of_one_group_nest_under_one_pipeline_run_and_two_groups_get_two(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMPIPE_RUN_GROUP", "repro-a")
    for stage in ("preprocess", "tokenize", "pretrain"):
        with stage_run(stage):
            pass
    monkeypatch.setenv("LMPIPE_RUN_GROUP", "repro-b")
    with stage_run("preprocess"):
        pass
    client = MlflowClient(tracking_uri)
    parents = {r.data.tags["lmpipe.group"]: r for r in _pipeline_runs(client)}
    assert sorted(parents) == ["repro-a", "repro-b"] and len(_pipeline_runs(client)) == 2
    stages = _stage_runs(client)
    assert len(stages) == 4
    for run in stages:
        assert _parent(run) == parents[run.data.tags["lmpipe.group"]].info.run_id
    a = parents["repro-a"]
    mine = [r for r in stages if r.data.tags["lmpipe.group"] == "repro-a"]
    assert a.info.run_name == "repro-a" and a.info.status == "FINISHED"
    assert a.info.end_time == max(r.info.end_time for r in mine)  # the last stage's end
    assert a.info.start_time < min(r.info.start_time for r in mine)  # newest-first lists put stages first
    assert not any(k.startswith("lmpipe.owner.") for k in a.data.tags)  # no process owns it
    exp = client.get_experiment_by_name("lmpipe")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training-runs kind


def test_a_failed_stage_marks_the_pipeline_run_failed_and_the_next_stage_runs_it_again(
    tracking_uri, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri)
    with stage_run("preprocess"):
        pass
    with pytest.raises(ValueError):
        with stage_run("tokenize"):
            raise ValueError("bad row")
    [parent] = _pipeline_runs(client)
    failed = next(r for r in _stage_runs(client) if r.data.tags["lmpipe.stage"] == "tokenize")
    assert parent.info.status == "FAILED" and parent.info.end_time == failed.info.end_time
    with stage_run("tokenize") as t:
        t.wait_open()
        assert client.get_run(parent.info.run_id).info.status == "RUNNING"
    assert client.get_run(parent.info.run_id).info.status == "FINISHED"


def test_headline_and_params_reach_the_pipeline_run_and_a_changed_param_keeps_its_first_value(
    tracking_uri, params, tmp_path, monkeypatch, caplog
):
    monkeypatch.chdir(tmp_path)
    headline = {"headline.acc": 0.84, "headline.gain": 0.02}
    with stage_run("evaluate", params, sections=("*",)) as t:
        t.log_metrics(headline)
        t.log_to_pipeline(headline, tags={"lmpipe.headline.model": "scratch"})
    client = MlflowClient(tracking_uri)
    [parent] = _pipeline_runs(client)
    evaluate = _only_run(tracking_uri)
    assert parent.data.metrics == headline
    assert parent.data.params == evaluate.data.params and "finetune.backbones.minilm.lr" in parent.data.params
    assert parent.data.tags["lmpipe.headline.model"] == "scratch"

    changed = params.model_copy(update={"base": params.base.model_copy(update={"seed": 7})})
    with stage_run("evaluate", changed, sections=("*",)) as t:  # same group (workspace), another seed
        t.log_to_pipeline({"headline.acc": 0.9})
    parent = client.get_run(parent.info.run_id)
    assert parent.data.params["base.seed"] == str(params.base.seed)  # MLflow params never change
    assert parent.data.metrics["headline.acc"] == 0.9 and parent.info.status == "FINISHED"
    assert "keeps its first value of 1 param(s)" in caplog.text
    assert all(r.info.status == "FINISHED" and "mlflow.parentRunId" in r.data.tags for r in _stage_runs(client))


def test_a_spooled_run_replays_nested_under_its_groups_pipeline_run(params, tmp_path, monkeypatch):
    from lmpipe.core.tracking import sync_spool

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LMPIPE_RUN_GROUP", "repro-offline")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens
    with pytest.warns(UserWarning, match="journaled"):
        with stage_run("evaluate", params, sections=("evaluate",)) as t:
            t.log_to_pipeline({"headline.acc": 0.8})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    [replayed] = sync_spool(client, uri, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with stage_run("export"):  # a live stage of the same group afterwards
        pass
    [parent] = _pipeline_runs(client)
    assert parent.data.tags["lmpipe.group"] == "repro-offline"
    assert {_parent(r) for r in _stage_runs(client)} == {parent.info.run_id}
    assert parent.data.metrics == {"headline.acc": 0.8} and parent.data.params["evaluate.bootstrap_samples"]
    assert parent.info.start_time < client.get_run(replayed).info.start_time
    assert parent.info.status == "FINISHED"


def test_close_orphans_ends_the_pipeline_run_of_a_dead_stage_and_leaves_pipeline_runs_alone(tracking_uri):
    from lmpipe.core.tracking import close_orphans, owner_tags, pipeline_run

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lmpipe")
    project = {"lmpipe.project": "proj"}
    dead = pipeline_run(client, exp, "dead", "proj", 1000)
    live = pipeline_run(client, exp, "live", "proj", 1000)
    for parent in (dead, live):
        client.update_run(parent, status="RUNNING")
    gone = {**owner_tags(), "lmpipe.owner.start": "1"}  # this pid, another start time: its owner is gone
    orphan = client.create_run(exp, tags={**project, **gone, "mlflow.parentRunId": dead}).info.run_id
    client.create_run(exp, tags={**project, **owner_tags(), "mlflow.parentRunId": live})
    assert close_orphans(client, "proj") == [orphan]
    assert client.get_run(dead).info.status == "KILLED"
    assert client.get_run(live).info.status == "RUNNING"


def test_two_processes_making_a_groups_pipeline_run_at_once_keep_the_first_made(tracking_uri, monkeypatch):
    from lmpipe.core import tracking

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lmpipe")
    tags = {"lmpipe.kind": "pipeline", "lmpipe.group": "g", "lmpipe.project": "proj", "lmpipe.created": "1"}
    first = client.create_run(exp, tags=tags, run_name="g").info.run_id  # the other process's, made just before
    real, looks = tracking._pipeline_runs, []

    def late_look(*args):  # the first look came before the other process's run existed
        looks.append(args)
        return [] if len(looks) == 1 else real(*args)

    monkeypatch.setattr(tracking, "_pipeline_runs", late_look)
    assert tracking.pipeline_run(client, exp, "g", "proj", 5000) == first
    assert [r.info.run_id for r in _pipeline_runs(client)] == [first]  # ours was deleted
    assert len(client.search_runs([exp], run_view_type=2)) == 1  # ViewType.DELETED_ONLY


def test_nest_flat_runs_nests_an_old_stores_groups_once(tracking_uri):
    from lmpipe.core.tracking import nest_flat_runs

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lmpipe")
    made = {}
    for group, acc in (("old-1", 0.8), ("old-2", 0.85)):
        for stage in ("preprocess", "evaluate"):
            tags = {"lmpipe.stage": stage, "lmpipe.group": group, "lmpipe.project": "proj"}
            run = client.create_run(exp, tags=tags, start_time=1000).info.run_id
            if stage == "evaluate":
                client.log_param(run, "base.seed", "42")
                client.log_metric(run, "headline.acc", acc)
                client.log_metric(run, "eval_seconds", 3.0)
            client.set_terminated(run, "FINISHED", end_time=2000 if stage == "preprocess" else 3000)
            made[run] = group
    nested = nest_flat_runs(client, exp)
    assert sorted(nested) == ["old-1", "old-2"]
    for run, group in made.items():
        assert _parent(client.get_run(run)) == nested[group]
    parent = client.get_run(nested["old-2"])
    assert parent.data.metrics == {"headline.acc": 0.85} and parent.data.params == {"base.seed": "42"}
    assert (parent.info.status, parent.info.start_time, parent.info.end_time) == ("FINISHED", 999, 3000)
    assert nest_flat_runs(client, exp) == {} and len(_pipeline_runs(client)) == 2
