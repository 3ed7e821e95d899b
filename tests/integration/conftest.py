"""A real copy of the project, a tiny params override, and the real `dvc` CLI.

`pipeline` copies the project's tracked files into a temporary git repository, shrinks the
params to a few-minute run on subsampled real IMDB data, runs the whole DAG with `dvc repro`
once for the session, and hands the copy to the tests. Runs land in the copy's own
`mlflow.db`, exactly where a user's would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = str(Path(sys.executable).parent)

# Small enough for 2 cores, big enough that every metric is defined (both labels everywhere).
TINY: dict[str, Any] = {
    "preprocess": {"max_train": 600, "max_val": 80, "max_test": 120},
    "tokenize": {"vocab_size": 1000},
    "pretrain": {
        "model": {"num_layers": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 128, "max_length": 64},
        "eval_batches": 2,
        "optim": {"warmup_steps": 2},
        "loop": {"max_steps": 8, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4, "log_every": 2},
    },
    "finetune": {
        "backbones": {
            "scratch": {"max_steps": 8, "lr": 1e-3},
            "random": {"max_steps": 8, "lr": 1e-3},
            "minilm": {"max_steps": 4},
        },
        "max_length": 64,
        "max_train_examples": 120,
        "batch_size": 8,
        "eval_every": 4,
        "checkpoint_every": 4,
    },
    "baseline": {"max_features": 5000},
    "evaluate": {"bootstrap_samples": 100},
    # near-chance tiny models: one int8 flip in 16 is a 0.06 drop; the gate has its own unit test
    "export": {"parity_samples": 16, "max_int8_accuracy_drop": 1.0},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return out


# secrets a user may have in the environment: none may reach MLflow, reports or the model card
SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "lmpipe-test-secret-password-5f2c",
    "AWS_SECRET_ACCESS_KEY": "lmpipe-test-secret-aws-key-9b1d",
    "LMPIPE_TEST_API_TOKEN": "hf_lmpipeTestSecretToken7e4a",
}


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    out.update(SECRETS)
    out.update(
        PATH=f"{BIN}:{out.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        LMPIPE_RUN_GROUP="integration",
        PYTHONUNBUFFERED="1",
    )
    return out


def run(
    cmd: list[str], cwd: Path, check: bool = True, timeout: int = 900, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd, cwd=cwd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}"
            f"\n--- stderr\n{done.stderr[-6000:]}"
        )
    return done


def dvc(*args: str, cwd: Path, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd=cwd, check=check, timeout=timeout)


def git(*args: str, cwd: Path) -> str:
    return run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.invalid", *args], cwd=cwd).stdout


def copy_project(dest: Path, override: dict | None = None) -> Path:
    """Copy the project's sources (tracked files and new, non-ignored ones) into a new repo.

    The workspace's own pipeline outputs stay behind: the copy runs its own pipeline, as a
    clean clone in CI does.
    """
    listed = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    outputs = ("data/", "models/", "checkpoints/", "reports/", "mlartifacts/", "dvc.lock")
    for rel in filter(None, listed):
        if rel.startswith(outputs):  # pipeline outputs of the workspace, tracked by git or not
            continue
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    (dest / "params.yaml").write_text(yaml.safe_dump(merge(params, override or TINY), sort_keys=False))
    (dest / "reports").mkdir(exist_ok=True)
    git("init", "-q", "-b", "main", cwd=dest)
    git("add", "-A", cwd=dest)
    git("commit", "-qm", "copy", cwd=dest)
    return dest


_REPRO: dict[str, Any] = {}  # the session's one background `dvc repro` (start_pipeline)


def start_pipeline(tmp_path_factory) -> dict[str, Any]:
    """Copy the project and start its tiny `dvc repro` in the background, once per session.

    tests/conftest.py calls this before the first test when any collected test uses `pipeline`,
    and runs the integration tests last: the unit tests fill the cores the repro leaves idle
    (stage start-up, dvc's own bookkeeping) instead of waiting for it.
    """
    if not _REPRO:
        path = copy_project(tmp_path_factory.mktemp("project"))
        log = tmp_path_factory.mktemp("repro-log")
        out, err = open(log / "stdout", "w+"), open(log / "stderr", "w+")  # files: a full pipe would block it
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=path,
            env=env(),
            stdout=out,
            stderr=err,
            text=True,
            start_new_session=True,  # its stages are its children: stop_pipeline ends the whole group
        )
        _REPRO.update(path=path, proc=proc, out=out, err=err, start=time.monotonic(), result=None)
    return _REPRO


def stop_pipeline() -> None:
    """End the background repro if the session ends before `pipeline` waited for it."""
    proc = _REPRO.get("proc")
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        for name in ("out", "err"):
            _REPRO[name].close()


def read_back(file) -> str:
    with file:
        file.seek(0)
        return file.read()


def wait_pipeline(started: dict[str, Any], timeout: int = 1500) -> dict[str, Any]:
    if started["result"] is None:
        proc = started["proc"]
        try:
            proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started["start"])))
        except subprocess.TimeoutExpired:
            stop_pipeline()
            raise AssertionError(f"dvc repro ran past {timeout} s") from None
        seconds = time.monotonic() - started["start"]
        stdout, stderr = (read_back(started[name]) for name in ("out", "err"))
        if proc.returncode != 0:
            raise AssertionError(
                f"dvc repro exited {proc.returncode}\n--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-6000:]}"
            )
        started["result"] = {"path": started["path"], "seconds": seconds, "log": stdout + stderr}
    return started["result"]


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict[str, Any]:
    """The project copy after one full `dvc repro` on tiny params (with its timing)."""
    return wait_pipeline(start_pipeline(tmp_path_factory))
