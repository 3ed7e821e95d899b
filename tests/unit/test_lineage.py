"""Hashes match what the real DVC records, so audits can compare them without DVC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from lmpipe.core.lineage import code_state, dvc_md5, git_state, read_lock, upstream_stages
from lmpipe.core.project import default_tracking_uri, project_root

DVC = [sys.executable, "-m", "dvc"]


def test_dvc_md5_equals_the_hashes_dvc_writes_to_dvc_lock(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=tmp_path, check=True, env=env)
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {
                "stages": {
                    "make": {
                        "cmd": "mkdir -p out/sub && printf 'a\\n' > out/a.txt && printf 'é' > out/sub/b"
                        " && printf 'x' > single.txt",
                        "outs": ["out", "single.txt"],
                    }
                }
            }
        )
    )
    subprocess.run([*DVC, "repro", "-q"], cwd=tmp_path, check=True, env=env)
    outs = {o["path"]: o["md5"] for o in read_lock(tmp_path)["make"]["outs"]}
    assert outs["out"] == dvc_md5(tmp_path / "out")
    assert outs["out"].endswith(".dir")
    assert outs["single.txt"] == dvc_md5(tmp_path / "single.txt")


def test_project_root_maps_a_dvc_temp_experiment_back_to_the_project(tmp_path, monkeypatch):
    (tmp_path / ".dvc").mkdir()
    temp_exp = tmp_path / ".dvc" / "tmp" / "exps" / "tmpabc"
    (temp_exp / ".dvc").mkdir(parents=True)
    assert project_root(temp_exp) == tmp_path.resolve()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(temp_exp) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri(temp_exp) == "http://127.0.0.1:5000"


def test_git_state_reports_revision_and_dirty_flag(tmp_path):
    def run(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    run("init", "-q")
    (tmp_path / "f").write_text("1")
    run("add", "f")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    clean = git_state(tmp_path)
    assert len(clean["rev"]) == 40 and clean["dirty"] is False
    (tmp_path / "f").write_text("2")
    assert git_state(tmp_path)["dirty"] is True
    assert git_state(Path("/"))["rev"] is None


def test_git_state_ignores_what_dvc_rewrites_but_not_the_code(tmp_path):
    def run(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    files = {
        "code.py": "x = 1\n",
        "dvc.lock": "schema: '2.0'\n",
        "models/.gitignore": "/a\n",
        "reports/perf/pretrain.json": "{}\n",
        "reports/evaluate/headline.json": "{}\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    lock = {
        "stages": {
            "pretrain": {"outs": [{"path": "reports/perf/pretrain.json", "md5": "0"}]},
            "evaluate": {"outs": [{"path": "reports/evaluate/headline.json", "md5": "1"}]},
        }
    }
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    run("init", "-q")
    run("add", "-A")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    for name in ("models/.gitignore", "reports/perf/pretrain.json", "reports/evaluate/headline.json"):
        (tmp_path / name).write_text("changed by dvc repro\n")
    lock["stages"]["pretrain"]["outs"][0]["md5"] = "2"
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    assert git_state(tmp_path)["dirty"] is False  # only what DVC itself rewrites
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True


def test_upstream_stages_follow_outputs_back_to_the_raw_data():
    lock = {
        "fetch": {"deps": [], "outs": [{"path": "data/raw"}]},
        "preprocess": {"deps": [{"path": "data/raw"}], "outs": [{"path": "data/processed"}]},
        "finetune@a": {"deps": [{"path": "data/processed"}], "outs": [{"path": "models/finetuned/a"}]},
        "finetune@b": {"deps": [{"path": "data/processed"}], "outs": [{"path": "models/finetuned/b"}]},
        "baseline": {"deps": [{"path": "data/processed"}], "outs": [{"path": "models/baseline"}]},
    }
    assert upstream_stages(lock, ["models/finetuned/a"]) == ["fetch", "preprocess", "finetune@a"]
    assert upstream_stages(lock, ["models/finetuned"]) == ["fetch", "preprocess", "finetune@a", "finetune@b"]


def test_code_state_follows_the_sources_not_head(tmp_path):
    def run(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()

    def commit(message):
        run("add", "-A")
        run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message)
        return run("rev-parse", "HEAD")

    lock = {"stages": {"train": {"deps": [{"path": "code"}, {"path": "data/x"}], "outs": [{"path": "reports/m.json"}]}}}
    for name, text in {"code/a.py": "x = 1\n", "params.yaml": "a: 1\n", "dvc.yaml": "stages: {}\n"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "dvc.lock").write_text(json.dumps(lock))
    run("init", "-q")
    sources = commit("code")
    (tmp_path / "README.md").write_text("docs\n")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/m.json").write_text("{}\n")
    later = commit("docs, lock and reports only")
    assert git_state(tmp_path)["rev"] == later
    assert code_state(tmp_path) == {"rev": sources, "dirty": False}  # a rebuild at `later` records the same
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert code_state(tmp_path)["dirty"] is True
    assert commit("params") == code_state(tmp_path)["rev"]
    assert code_state(Path("/"))["rev"] is None
