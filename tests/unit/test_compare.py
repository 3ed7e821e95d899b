"""`lmpipe compare` on a real MLflow store: one row per group, the params that differ, the CI."""

from __future__ import annotations

import json

import pytest

from lmpipe.cli.compare import collect, differing_params, table
from lmpipe.cli.main import main
from lmpipe.core.lineage import TAG_GROUP, TAG_HEADLINE_MODEL, TAG_STAGE


def log_evaluate(client, exp, group, lr, acc, status="FINISHED", headline=True):
    run = client.create_run(exp, tags={TAG_STAGE: "evaluate", TAG_GROUP: group, TAG_HEADLINE_MODEL: "scratch"})
    for key, value in {"finetune.backbones.scratch.lr": lr, "base.seed": "42", "base.experiment": "lmpipe"}.items():
        client.log_param(run.info.run_id, key, value)
    if headline:
        numbers = {
            "acc": acc,
            "acc_lo": acc - 0.02,
            "acc_hi": acc + 0.015,
            "f1": acc - 0.001,
            "tfidf_acc": 0.9085,
            "gain": 0.021,
        }
        for key, value in numbers.items():
            client.log_metric(run.info.run_id, f"headline.{key}", value)
    client.log_metric(run.info.run_id, "pretrained.test_mlm_perplexity", 202.3)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lmpipe")
    log_evaluate(client, exp, "repro-1", "0.001", 0.80)  # superseded by the rerun below
    log_evaluate(client, exp, "repro-1", "0.001", 0.835)
    log_evaluate(client, exp, "lr3e-4", "0.0003", 0.8125)
    log_evaluate(client, exp, "killed", "0.01", 0.5, status="KILLED")
    log_evaluate(client, exp, "old", "0.002", 0.7, headline=False)  # from before headline metrics
    return client


def test_one_row_per_group_newest_finished_run_with_the_params_that_differ(store):
    rows = collect(store, "lmpipe")
    assert [r.group for r in rows] == ["lr3e-4", "repro-1"]
    assert rows[1].numbers["acc"] == pytest.approx(0.835)  # the group's latest run
    assert differing_params(rows) == ["finetune.backbones.scratch.lr"]  # seed is equal, experiment ignored
    text = table(rows, differing_params(rows))
    header, first, second = text.splitlines()
    assert header.split() == [
        "group",
        "finetune.backbones.scratch.lr",
        "model",
        "acc",
        "[95%",
        "CI]",
        "f1",
        "tfidf",
        "gain",
        "ppl",
    ]
    assert second.split() == [
        "repro-1",
        "0.001",
        "scratch",
        "0.8350",
        "[0.8150,",
        "0.8500]",
        "0.8340",
        "0.9085",
        "+0.0210",
        "202.3",
    ]
    assert max(len(line) for line in text.splitlines()) <= 120


def test_the_command_prints_json_and_names_an_unknown_experiment(store, tracking_uri, capsys):
    assert main(["compare", "--json", "--last", "1", "--param", "finetune.backbones.scratch.lr"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["group"] for r in rows] == ["lr3e-4"] and rows[0]["params"] == {"finetune.backbones.scratch.lr": "0.0003"}
    assert main(["compare", "--experiment", "nope"]) == 2
    assert "no experiment 'nope'" in capsys.readouterr().err


def test_pipeline_runs_carrying_the_headline_are_no_rows(tracking_uri, project_root, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from lmpipe.core.params import load_params
    from lmpipe.core.tracking import stage_run

    monkeypatch.chdir(tmp_path)
    params = load_params(project_root / "params.yaml")
    for group, acc in (("repro-1", 0.83), ("repro-2", 0.85)):
        monkeypatch.setenv("LMPIPE_RUN_GROUP", group)
        headline = {"headline.acc": acc, "headline.f1": acc}
        with stage_run("evaluate", params, sections=("*",)) as t:
            t.log_metrics(headline)
            t.log_to_pipeline(headline, tags={TAG_HEADLINE_MODEL: "scratch"})
            evaluate_id = t.run_id
    client = MlflowClient(tracking_uri)
    rows = collect(client, "lmpipe")
    assert [r.group for r in rows] == ["repro-2", "repro-1"]
    assert rows[0].run_id == evaluate_id and rows[0].numbers["acc"] == 0.85
    kinds = {client.get_run(r.run_id).data.tags["lmpipe.kind"] for r in rows}
    assert kinds == {"stage"}  # the pipeline (parent) runs have the same numbers, but are not rows
