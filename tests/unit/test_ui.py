"""`lmpipe ui-url`: the address of the runs table in MLflow 3.17's UI, the experiment tagged, old runs nested."""

from __future__ import annotations

import argparse

from lmpipe.cli.ui import add_ui_url_parser, runs_url


def ui_url(*args: str) -> int:
    parser = argparse.ArgumentParser()
    add_ui_url_parser(parser.add_subparsers())
    parsed = parser.parse_args(["ui-url", *args])
    return parsed.func(parsed)


def test_the_address_opens_the_training_runs_table():
    # MLflow 3.17's UI: route /experiments/:experimentId/:tabName in a hash router; without
    # workflowType=machine_learning an experiment opens on the GenAI overview (the browser's default)
    assert runs_url("http://127.0.0.1:5000/", "7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning"
    )


def test_ui_url_tags_the_experiment_names_flat_groups_and_nests_them(tracking_uri, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment("lmpipe")  # made by an older lmpipe: no kind tag, flat runs
    tags = {"lmpipe.stage": "preprocess", "lmpipe.group": "repro-old", "lmpipe.project": "proj"}
    run = client.create_run(exp, tags=tags).info.run_id
    assert ui_url("--port", "5055") == 0
    out, err = capsys.readouterr()
    assert out == f"http://127.0.0.1:5055/#/experiments/{exp}/runs?workflowType=machine_learning\n"
    assert "repro-old" in err and "--nest" in err
    assert client.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    assert ui_url("--nest") == 0 and "nested the stage runs of 1 group(s)" in capsys.readouterr().err
    assert "mlflow.parentRunId" in client.get_run(run).data.tags


def test_ui_url_without_a_store_creates_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert ui_url() == 0
    assert capsys.readouterr().out == "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning\n"
    assert not (tmp_path / "mlflow.db").exists()
