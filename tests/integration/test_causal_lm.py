"""The causal LM through the real `dvc` CLI, as the README tells a user to turn it on.

A copy of the tiny project takes the `pipeline` fixture's finished data stages, baseline and
finetune@minilm (chaos.seed_from), then `dvc exp run -S pretrain.objective=clm -S
pretrain.model.family=llama` takes a llama decoder through pretrain, finetune@scratch and
@random, evaluate (with its prompted rows) and export, into MLflow with its params. Then its
pretraining is run again from step 0 and SIGKILLed after a checkpoint: the next `dvc repro`
resumes from that checkpoint and writes the experiment's bytes, so nothing downstream reruns.
"""

from __future__ import annotations

import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from .chaos import KillPoint, checkpoint_dir, output_md5s, repro, repro_and_kill, resumed_steps, seed_from
from .conftest import copy_project, dvc, git

pytestmark = pytest.mark.integration

SEEDED = ["fetch", "fetch_backbone", "preprocess", "tokenize", "baseline", "finetune@minilm"]
DECODER = ["pretrain.objective=clm", "pretrain.model.family=llama"]
# 120 steps of the tiny decoder (a checkpoint every 10): a kill after the first checkpoint lands
# with many steps still to run, however fast the machine
LONGER = ["pretrain.loop.max_steps=120", "pretrain.loop.checkpoint_every=10", "pretrain.loop.eval_every=60"]
# the tiny 64-token context holds the template and 2 examples, not the default 4 (61 of 64 tokens
# before the review: evaluate stops with that figure and "fewer shots or a longer context")
SHOTS = ["evaluate.prompting.shots=2"]
SHIP = ["export.model=scratch"]  # export the decoder classifier (best by validation could be minilm)


def test_exp_run_takes_a_decoder_through_the_dag_and_its_killed_pretraining_resumes_to_the_same_bytes(
    pipeline, tmp_path
):
    path = copy_project(tmp_path / "project")
    seed_from(pipeline["path"], path, SEEDED)
    git("add", "-A", cwd=path)
    git("commit", "-qm", "seeded", cwd=path)

    sets = [arg for s in DECODER + LONGER + SHOTS + SHIP for arg in ("-S", s)]
    dvc("exp", "run", "-n", "clm-tiny", *sets, cwd=path, timeout=1200)

    # every stage the objective reaches ran on the decoder, and its figures are there
    headline = json.loads((path / "reports/pretrain/headline.json").read_text())
    assert {"ppl", "ppl_ratio", "ppl_vs_bigram"} <= set(headline), headline
    config = json.loads((path / "models/pretrained/config.json").read_text())
    assert config["model_type"] == "llama", config
    comparison = (path / "reports/evaluate/comparison.md").read_text()
    assert "clm_zero_shot" in comparison and "clm_few_shot" in comparison, comparison
    assert (path / "models/export/onnx/model.onnx").is_file()  # the export stage's parity gates passed
    exported = json.loads((path / "models/export/hf/config.json").read_text())
    assert exported["model_type"] == "llama", exported
    assert "clm-tiny" in dvc("exp", "show", "--json", cwd=path).stdout

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmpipe")
    runs = client.search_runs([exp.experiment_id], "tags.`dvc.exp_name` = 'clm-tiny'", max_results=100)
    by_stage = {r.data.tags.get("lmpipe.stage"): r for r in runs if "lmpipe.stage" in r.data.tags}
    assert {"pretrain", "finetune@scratch", "finetune@random", "evaluate", "export"} <= set(by_stage), set(by_stage)
    pretrain_run = by_stage["pretrain"]
    assert pretrain_run.info.status == "FINISHED"
    assert pretrain_run.data.params["pretrain.objective"] == "clm"
    assert pretrain_run.data.params["pretrain.model.family"] == "llama"
    assert {"bigram_perplexity", "perplexity_vs_bigram"} <= set(pretrain_run.data.metrics)
    samples = [a.path for a in client.list_artifacts(pretrain_run.info.run_id, "samples")]
    assert samples, "no generated samples logged at the evaluations"

    # the same pretraining from step 0, SIGKILLed after a checkpoint, then resumed by `dvc repro`
    reference = output_md5s(path)
    for folder in ("models/pretrained", checkpoint_dir("pretrain")):
        shutil.rmtree(path / folder)
    kill = repro_and_kill(path, KillPoint("pretrain", 10, 0.0), tmp_path / "killed.log")
    detail = f"{kill}\n{kill.log[-4000:]}"
    assert kill.reached and kill.returncode == -9 and not kill.finished, detail
    assert kill.on_disk is not None and kill.on_disk < 120, detail

    repro(path, tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text(errors="replace")
    assert resumed_steps(log).get(checkpoint_dir("pretrain")) == kill.on_disk, log[-4000:]
    now = output_md5s(path)
    differ = {p: (now.get(p), reference[p]) for p in reference if now.get(p) != reference[p]}
    assert not differ, differ
    assert "Running stage 'pretrain'" in log, log[-4000:]
    downstream = ("finetune@scratch", "finetune@random", "evaluate", "export")
    assert not [s for s in downstream if f"Running stage '{s}'" in log], log[-4000:]  # their input kept its bytes
    assert json.loads(dvc("status", "--json", cwd=path).stdout) == {}
