"""The `lmpipe` command line: fast help, params check, errors as one line."""

from __future__ import annotations

import subprocess
import sys

from lmpipe.cli.main import main


def test_help_lists_every_command_without_heavy_imports():
    code = (
        "import sys; from lmpipe.cli.main import build_parser; build_parser();"
        "heavy = [m for m in ('torch', 'transformers', 'mlflow', 'dvc', 'sklearn') if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    help_text = subprocess.run(
        [sys.executable, "-m", "lmpipe.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("params", "audit", "predict"):
        assert command in help_text


def test_params_check_accepts_the_shipped_file(project_root, capsys):
    assert main(["params", "check", str(project_root / "params.yaml")]) == 0
    assert "OK" in capsys.readouterr().out


def test_params_check_names_the_bad_key(tmp_path, project_root, capsys):
    bad = tmp_path / "params.yaml"
    bad.write_text((project_root / "params.yaml").read_text().replace("rank: 8", "rank: 0"))
    assert main(["params", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "finetune.lora.rank must be >= 1 (got 0)" in err


def test_audit_without_a_pipeline_is_a_clear_error(tmp_path, capsys):
    assert main(["audit", "--project", str(tmp_path), "--no-mlflow"]) == 2
    assert f"{tmp_path}: no dvc.lock here (pass --project PATH" in capsys.readouterr().err


def test_audit_of_a_registered_model_needs_the_store(tmp_path, capsys):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    assert main(["audit", "models:/lmpipe-classifier/1", "--project", str(tmp_path), "--no-mlflow"]) == 2
    assert "a registered model needs the MLflow store" in capsys.readouterr().err
