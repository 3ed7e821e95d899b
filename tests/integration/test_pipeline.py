"""The whole DAG through the real `dvc` CLI on subsampled real IMDB data, in a project copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lmpipe.core.lineage import dvc_md5, read_lock

from .conftest import SECRETS, dvc, git, run

pytestmark = pytest.mark.integration

STAGES = {
    "fetch",
    "fetch_backbone",
    "preprocess",
    "tokenize",
    "pretrain",
    "finetune@scratch",
    "finetune@random",
    "finetune@minilm",
    "baseline",
    "evaluate",
    "export",
}


def runs_by_stage(path):
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id], max_results=500)
    by_stage: dict[str, list] = {}
    for r in runs:
        if "lmpipe.stage" in r.data.tags:  # a stage run, not a pipeline (parent) run
            by_stage.setdefault(r.data.tags["lmpipe.stage"], []).append(r)
    return by_stage


def test_repro_writes_every_output_and_a_complete_lock(pipeline):
    path = pipeline["path"]
    lock = read_lock(path)
    assert set(lock) == STAGES
    for name, entry in lock.items():
        for out in entry["outs"]:
            assert (path / out["path"]).exists(), f"{name}: {out['path']} missing"
            assert dvc_md5(path / out["path"]) == out["md5"], out["path"]
    assert (path / "data/processed/train.parquet").exists()
    assert json.loads((path / "data/tokens/meta.json").read_text())["train"]["tokens"] > 0
    status = dvc("status", "--json", cwd=path).stdout
    assert json.loads(status) == {}, status


def test_second_repro_runs_nothing(pipeline):
    out = dvc("repro", cwd=pipeline["path"]).stdout
    assert "Running stage" not in out
    assert "didn't change, skipping" in out


def test_every_stage_logged_one_finished_run_with_hash_tags(pipeline):
    path = pipeline["path"]
    by_stage = runs_by_stage(path)
    assert set(by_stage) == STAGES
    lock = read_lock(path)
    for stage, runs in by_stage.items():
        finished = [r for r in runs if r.info.status == "FINISHED"]
        assert len(finished) >= 1, stage
        run = finished[0]
        assert run.data.tags["lmpipe.group"] == "integration"
        recorded = {o["path"]: o["md5"] for o in lock[stage]["outs"]}
        tagged = {k[len("dvc.out.") :]: v for k, v in run.data.tags.items() if k.startswith("dvc.out.")}
        assert tagged, f"{stage} tagged no output hash"
        for out_path, md5 in tagged.items():
            assert recorded[out_path] == md5, (stage, out_path)
    for stage in ("preprocess", "tokenize", "pretrain", "finetune@scratch", "baseline", "evaluate", "export"):
        assert by_stage[stage][0].data.metrics, f"{stage} logged no metrics"
    evaluate = by_stage["evaluate"][0]
    assert "finetune.backbones.minilm.lr" in evaluate.data.params  # every upstream param
    assert "pretrain.optim.lr" in evaluate.data.params


def test_the_stage_runs_of_the_repro_nest_under_one_pipeline_run_with_the_headline(pipeline):
    path = pipeline["path"]
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on its runs table
    query = "tags.`lmpipe.kind` = 'pipeline' and tags.`lmpipe.group` = 'integration'"
    [parent] = client.search_runs([exp.experiment_id], query)  # one, whatever later tests rerun in the group
    assert parent.info.run_name == "integration"
    by_stage = runs_by_stage(path)
    first = {stage: min(runs, key=lambda r: r.info.start_time) for stage, runs in by_stage.items()}
    assert set(first) == STAGES  # the session's first repro: one run per stage, before later tests add any
    for stage, found in first.items():
        assert found.data.tags["mlflow.parentRunId"] == parent.info.run_id, stage
        assert found.data.tags["lmpipe.kind"] == "stage"
    evaluate = first["evaluate"]
    headline = {k: v for k, v in evaluate.data.metrics.items() if k.startswith("headline.")}
    assert set(headline) == {f"headline.{k}" for k in ("acc", "acc_lo", "acc_hi", "f1", "tfidf_acc", "gain")}
    assert {k: parent.data.metrics[k] for k in headline} == headline
    assert parent.data.params["finetune.backbones.minilm.lr"] == evaluate.data.params["finetune.backbones.minilm.lr"]
    assert parent.data.tags["lmpipe.headline.model"] == evaluate.data.tags["lmpipe.headline.model"]
    assert parent.info.status == "FINISHED"
    assert parent.info.start_time < min(r.info.start_time for r in first.values())
    assert parent.info.end_time >= max(r.info.end_time for r in first.values())


def test_dvc_metrics_show_is_a_compact_headline_that_fits_a_terminal(pipeline):
    path = pipeline["path"]
    shown = json.loads(dvc("metrics", "show", "--json", cwd=path).stdout)
    files = shown[""]["data"] if "" in shown else next(iter(shown.values()))["data"]
    assert set(files) == {"reports/pretrain/headline.json", "reports/evaluate/headline.json"}
    evaluate = files["reports/evaluate/headline.json"]["data"]
    assert set(evaluate) == {"model", "acc", "acc_lo", "acc_hi", "f1", "tfidf_acc", "gain"}
    assert evaluate["acc_lo"] <= evaluate["acc"] <= evaluate["acc_hi"]
    assert set(files["reports/pretrain/headline.json"]["data"]) == {"ppl", "ppl_ratio"}
    table = dvc("metrics", "show", cwd=path).stdout
    assert max(len(line) for line in table.splitlines()) <= 120, table
    details = json.loads((path / "reports/evaluate/metrics.json").read_text())
    assert details[evaluate["model"]]["accuracy"] == evaluate["acc"]  # the detail stays in the report


def test_evaluate_compares_the_pretrained_encoder_with_its_random_init_control(pipeline):
    path = pipeline["path"]
    head = json.loads((path / "reports/evaluate/metrics.json").read_text())
    assert set(head) >= {"baseline", "scratch", "random", "minilm"}
    scratch = head["scratch"]
    diff = scratch["accuracy"] - head["random"]["accuracy"]
    assert scratch["vs_random_accuracy_diff"] == pytest.approx(diff)
    assert scratch["vs_random_ci_low"] <= scratch["vs_random_accuracy_diff"] <= scratch["vs_random_ci_high"]
    assert "vs_random_accuracy_diff" not in head["minilm"]  # no random-init twin of MiniLM
    assert "| scratch | random |" in (path / "reports/evaluate/comparison.md").read_text()
    info = json.loads((path / "models/finetuned/random/lmpipe.json").read_text())
    assert (info["init"], info["source"]) == ("random", "models/pretrained")
    pretrain = json.loads((path / "reports/pretrain/metrics.json").read_text())
    assert pretrain["unigram_perplexity"] > 1 and pretrain["perplexity_vs_unigram"] > 0


def test_forced_rerun_of_data_stages_gives_identical_bytes(pipeline):
    path = pipeline["path"]
    before = read_lock(path)
    dvc("repro", "-f", "-s", "preprocess", "tokenize", cwd=path)  # each forced, in this order, nothing else
    after = read_lock(path)

    def results(outs):
        return [o for o in outs if not o["path"].startswith("reports/perf/")]  # timings live there only

    for stage in ("preprocess", "tokenize"):
        assert results(after[stage]["outs"]) == results(before[stage]["outs"]), stage
    assert dvc("status", "--json", cwd=path).stdout.strip() == "{}"  # nothing downstream to rerun


def test_exp_run_reruns_only_what_depends_on_the_param_and_logs_to_the_same_store(pipeline):
    path = pipeline["path"]
    git("add", "-A", cwd=path)
    git("commit", "-qm", "after repro", cwd=path)
    before = runs_by_stage(path)
    dvc("exp", "run", "--temp", "-n", "smaller-val", "-S", "preprocess.max_val=60", "tokenize", cwd=path)
    after = runs_by_stage(path)
    new = {s for s in after if len(after[s]) > len(before.get(s, []))}
    assert new == {"preprocess", "tokenize"}
    tagged = [r for r in after["preprocess"] if r.data.tags.get("dvc.exp_name") == "smaller-val"]
    assert tagged and tagged[0].info.status == "FINISHED"
    shown = dvc("exp", "show", "--json", cwd=path).stdout
    assert "smaller-val" in shown
    table = run(
        [sys.executable, "-m", "dvc", "exp", "show", "--only-changed", "--drop", ".*/", "--no-pager"],
        cwd=path,
        extra_env={"COLUMNS": "120"},
    ).stdout
    assert "smaller-val" in table and "…" not in table, table


def test_audit_passes_on_a_fresh_pipeline(pipeline):
    path = pipeline["path"]
    done = run([sys.executable, "-m", "lmpipe.cli", "audit", "--json"], cwd=path)
    report = json.loads(done.stdout)
    assert report["ok"], report["problems"]
    names = [s["name"] for s in report["stages"]]
    assert names[0] in ("fetch", "fetch_backbone") and names[-1] == "export"
    assert {"preprocess", "tokenize", "pretrain", "finetune@scratch"} <= set(names)
    assert any(s["mlflow_runs"] for s in report["stages"])


def test_audit_names_a_changed_weights_file(pipeline):
    path = pipeline["path"]
    weights = path / "models/export/hf/model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        done = run([sys.executable, "-m", "lmpipe.cli", "audit"], cwd=path, check=False)
        assert done.returncode == 1
        assert "models/export/hf/model.safetensors changed" in done.stdout
    finally:
        weights.write_bytes(original)


def test_audit_reports_a_stage_made_stale_by_a_param_change(pipeline):
    path = pipeline["path"]
    params_file = path / "params.yaml"
    original = params_file.read_text()
    try:
        params = yaml.safe_load(original)
        params["finetune"]["backbones"]["scratch"]["lr"] = 0.123
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        done = run([sys.executable, "-m", "lmpipe.cli", "audit"], cwd=path, check=False)
        assert done.returncode == 1
        assert "finetune@scratch: stale: param finetune.backbones.scratch" in done.stdout
    finally:
        params_file.write_text(original)


def test_audit_takes_an_absolute_path_from_a_sub_folder(pipeline):
    path = pipeline["path"]
    done = run([sys.executable, "-m", "lmpipe.cli", "audit", str(path / "models/export"), "--json"], cwd=path / "data")
    report = json.loads(done.stdout)
    assert report["ok"] and report["target"] == "models/export", report["problems"]


def test_audit_of_a_copy_outside_the_project_checks_its_bytes(pipeline, tmp_path):
    path = pipeline["path"]
    serving = tmp_path / "srv" / "model"
    shutil.copytree(path / "models/export", serving)
    done = run(
        [sys.executable, "-m", "lmpipe.cli", "audit", str(serving), "--project", str(path), "--json"], cwd=tmp_path
    )
    report = json.loads(done.stdout)
    assert report["ok"], report["problems"]
    assert report["copy"]["match"] == {
        "out": "models/export",
        "part": "",
        "md5": dvc_md5(path / "models/export"),
        "recorded_in_lock": True,
    }
    assert [s["name"] for s in report["stages"]][-1] == "export"  # the output's own audit follows
    weights = serving / "hf/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    done = run(
        [sys.executable, "-m", "lmpipe.cli", "audit", str(serving), "--project", str(path)], cwd=tmp_path, check=False
    )
    assert done.returncode == 1
    assert f"{weights}: differs from the md5 in its lineage.json" in done.stdout
    assert "match no output version" in done.stdout


def test_audit_of_the_registered_model_finds_the_export_it_came_from(pipeline):
    path = pipeline["path"]
    done = run([sys.executable, "-m", "lmpipe.cli", "audit", "models:/lmpipe-classifier/latest", "--json"], cwd=path)
    report = json.loads(done.stdout)
    assert report["ok"], report["problems"]
    assert report["copy"]["match"]["out"] == "models/export" and report["copy"]["match"]["part"] == "hf"


def test_compare_prints_one_row_per_pipeline_run(pipeline):
    done = run([sys.executable, "-m", "lmpipe.cli", "compare"], cwd=pipeline["path"])
    header, *rows = done.stdout.splitlines()
    assert header.split()[:3] == ["group", "model", "acc"] and rows, done.stdout
    assert max(len(line) for line in done.stdout.splitlines()) <= 120


def test_push_clone_pull_restores_every_output_and_the_audit_passes(pipeline, tmp_path):
    path = pipeline["path"]
    remote = tmp_path / "remote"
    dvc("remote", "modify", "--local", "storage", "url", str(remote), cwd=path)
    dvc("push", cwd=path)
    git("add", "-A", cwd=path)
    git("commit", "-qm", "pipeline outputs", "--allow-empty", cwd=path)
    fresh = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(path), str(fresh)], check=True)
    dvc("remote", "modify", "--local", "storage", "url", str(remote), cwd=fresh)
    dvc("pull", cwd=fresh)
    status = json.loads(dvc("status", "--json", cwd=fresh).stdout)
    assert status == {}, status  # nothing to rerun
    done = run([sys.executable, "-m", "lmpipe.cli", "audit", "--no-mlflow"], cwd=fresh)
    assert "OK:" in done.stdout
    assert (fresh / "models/export/hf/model.safetensors").read_bytes() == (
        path / "models/export/hf/model.safetensors"
    ).read_bytes()
    shutil.rmtree(fresh)


def test_no_secret_in_the_environment_reaches_mlflow_the_model_card_lineage_or_reports(pipeline):
    path = pipeline["path"]  # every stage ran with SECRETS in its environment
    stores = [path / "mlflow.db", *(p for p in (path / "mlartifacts").rglob("*") if p.is_file())]
    written = [
        *stores,
        *(p for p in (path / "reports").rglob("*") if p.is_file()),
        *(path / "models/export").rglob("*"),
    ]
    for file in (f for f in written if f.is_file()):
        data = file.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in data, f"{name} leaked into {file.relative_to(path)}"
    assert (path / "mlflow.db").stat().st_size > 0 and (path / "models/export/lineage.json").is_file()
