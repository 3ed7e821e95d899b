"""`lmpipe audit --rebuild` on the session's tiny run: identical, within-CI, beyond-CI, failed.

One real rebuild of the whole tiny DAG (the `rebuilt` fixture: `lmpipe audit --rebuild --keep`
through the CLI, the real `dvc repro` in a fresh copy) answers the identical case. The within-CI
and beyond-CI cases judge that same rebuild, file for file, against copies of the committed record
edited the way another machine's record would differ (a model's bytes; a metric's CI), so the
suite pays for one rebuild, not three.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmpipe.audit import rebuild as rb
from lmpipe.core.lineage import dvc_md5, read_lock

from .conftest import git, run
from .test_numerics import OTHER_KERNELS

pytestmark = pytest.mark.integration

# The ambient environment each rebuild runs under, by test id (added to conftest.env()). In
# `base.numerics: portable` each stage pins its own numeric settings, so any of these must give
# identical bytes: the whole tiny DAG under other kernels and threads than the committed run had
# (tests/integration/test_numerics.py shows the same change moves the bytes in `fast` mode).
REBUILD_ENVS: dict[str, dict[str, str]] = {"other-kernels": OTHER_KERNELS}


def lmpipe(*args: str, cwd: Path, extra_env: dict[str, str] | None = None, timeout: int = 900):
    return run([sys.executable, "-m", "lmpipe.cli", *args], cwd=cwd, check=False, timeout=timeout, extra_env=extra_env)


@pytest.fixture(scope="module", params=list(REBUILD_ENVS))
def rebuilt(request, pipeline, tmp_path_factory) -> dict[str, Any]:
    """`lmpipe audit --rebuild --keep --json` of the session's tiny run, in a kept workdir."""
    project = pipeline["path"]
    tmp = tmp_path_factory.mktemp("rebuild")
    elsewhere = tmp / "ambient-store.db"  # an ambient tracking URI: the rebuild must not log there
    env = {**REBUILD_ENVS[request.param], "MLFLOW_TRACKING_URI": f"sqlite:///{elsewhere}"}
    lock_before = (project / "dvc.lock").read_text()
    start = time.monotonic()
    # cwd outside the project: `python -m` would import the copy's own lmpipe from the cwd
    args = ["audit", "--rebuild", "--keep", "--json", "--workdir", str(tmp / "work"), "--project", str(project)]
    done = lmpipe(*args, cwd=tmp, extra_env=env, timeout=1500)
    return {
        "done": done,
        "report": json.loads(done.stdout) if done.stdout.startswith("{") else None,
        "copy": tmp / "work" / "project",
        "seconds": time.monotonic() - start,
        "elsewhere": elsewhere,
        "lock_untouched": (project / "dvc.lock").read_text() == lock_before,
    }


def committed_record(pipeline, dest: Path) -> Path:
    """A copy of what the verdict reads of the committed run: its dvc.lock and reports."""
    dest.mkdir()
    shutil.copy2(pipeline["path"] / "dvc.lock", dest / "dvc.lock")
    shutil.copytree(pipeline["path"] / "reports", dest / "reports")
    return dest


def set_recorded_md5(root: Path, path: str, md5: str) -> None:
    """Make the record in `root`/dvc.lock say `path` (an output) had content `md5`."""
    data = yaml.safe_load((root / "dvc.lock").read_text())
    hits = [o for e in data["stages"].values() for o in e["outs"] if o["path"] == path]
    assert len(hits) == 1, path
    hits[0]["md5"] = md5
    (root / "dvc.lock").write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_rebuild_on_the_same_machine_is_identical(rebuilt, pipeline):
    done, report = rebuilt["done"], rebuilt["report"]
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert report["verdict"] == "identical" and report["exit_code"] == 0
    assert set(report["stages"]) == set(read_lock(pipeline["path"])) and report["targets"] == ["export"]
    by_status: dict[str, list[str]] = {}
    for out in report["outputs"]:
        by_status.setdefault(out["status"], []).append(out["path"])
    assert set(by_status) <= {"identical", "timing"}, by_status
    assert "models/export" in by_status["identical"] and "models/pretrained" in by_status["identical"]
    assert by_status["timing"] and all(p.startswith("reports/perf/") for p in by_status["timing"])
    assert report["changed_inputs"] == [] and report["notes"] == [] and report["metrics"] == []
    assert report["machine"]["cpu"] and report["machine"]["cores"]
    assert OTHER_KERNELS.items() <= report["machine"]["env"].items()  # the rebuild ran under other kernels ...
    numerics = json.loads((rebuilt["copy"] / "reports/perf/pretrain.json").read_text())["numerics"]
    assert numerics["mode"] == "portable" and numerics["torch_isa"] == "AVX2"  # ... which each stage pinned back
    assert OTHER_KERNELS.items() <= numerics["replaced"].items()  # and put on record
    assert "Running stage 'export'" in done.stderr  # dvc's log streams to stderr; stdout is the report
    # the copy logged to its own store under the rebuild's group, not to the ambient one or the project's
    assert not rebuilt["elsewhere"].exists()
    with sqlite3.connect(rebuilt["copy"] / "mlflow.db") as db:
        groups = db.execute("select distinct value from tags where key = 'lmpipe.group'").fetchall()
    assert groups == [(report["run_group"],)] and report["run_group"].startswith("rebuild-")
    assert rebuilt["lock_untouched"]


def test_the_text_report_lists_every_output_and_the_verdict(rebuilt):
    text = rb.format_rebuild(rebuilt["report"])
    assert "models/export" in text and "timing (not judged)" in text
    assert text.rstrip().endswith("verdict: identical (exit 0): every output has the bytes dvc.lock records")


def test_different_model_bytes_with_every_metric_inside_the_ci_is_within_ci(rebuilt, pipeline, tmp_path):
    # a record whose baseline model has other bytes than this machine rebuilds (as another CPU family's would)
    committed = committed_record(pipeline, tmp_path / "committed")
    set_recorded_md5(committed, "models/baseline", "0" * 32 + ".dir")
    report = rb.judge(committed, rebuilt["copy"], rebuilt["report"]["stages"])
    assert (report["verdict"], report["exit_code"]) == ("within-ci", 3)
    differ = [o["path"] for o in report["outputs"] if o["status"] not in ("identical", "timing")]
    assert differ == ["models/baseline"]
    judged = [m for m in report["metrics"] if m["status"] != "no-ci"]
    names = {m["name"] for m in judged}
    for model in ("baseline", "scratch", "random", "minilm"):
        assert {f"{model}.accuracy", f"{model}.f1"} <= names, model
    assert "scratch.vs_random_accuracy_diff" in names
    assert all(m["status"] == "inside" for m in judged)
    assert [m["name"] for m in report["metrics"] if m["status"] == "no-ci"] == ["pretrain.ppl"]


def test_a_metric_outside_the_committed_ci_is_beyond_ci_and_named(rebuilt, pipeline, tmp_path):
    # a record whose scratch accuracy CI lies above what this machine gets (and whose lock records that file)
    committed = committed_record(pipeline, tmp_path / "committed")
    metrics_path = committed / rb.EVAL_METRICS
    metrics = json.loads(metrics_path.read_text())
    accuracy = metrics["scratch"]["accuracy"]
    metrics["scratch"].update(accuracy_ci_low=accuracy + 0.1, accuracy_ci_high=accuracy + 0.2)
    metrics_path.write_text(json.dumps(metrics, indent=2))
    set_recorded_md5(committed, rb.EVAL_METRICS, dvc_md5(metrics_path))
    rb.judge_files(committed, read_lock(committed), rebuilt["report"]["stages"])  # a consistent record
    report = rb.judge(committed, rebuilt["copy"], rebuilt["report"]["stages"])
    assert (report["verdict"], report["exit_code"]) == ("beyond-ci", 4)
    assert [o["path"] for o in report["outputs"] if o["status"] == "different"] == [rb.EVAL_METRICS]
    outside = [m for m in report["metrics"] if m["status"] != "inside" and m["status"] != "no-ci"]
    assert outside == [
        {
            "name": "scratch.accuracy",
            "committed": accuracy,
            "rebuilt": accuracy,
            "ci_low": accuracy + 0.1,
            "ci_high": accuracy + 0.2,
            "status": "outside",
        }
    ]


def test_a_failed_rebuild_exits_1_with_the_tail_of_its_log(pipeline, tmp_path):
    # the committed sources with a param no stage accepts: `fetch` stops before any work
    project = tmp_path / "project"
    git("clone", "-q", str(pipeline["path"]), str(project), cwd=tmp_path)
    shutil.copy2(pipeline["path"] / "dvc.lock", project / "dvc.lock")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["fetch"]["source"] = "no-such-corpus"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    temp = tmp_path / "temp"
    temp.mkdir()
    done = lmpipe(
        "audit", "--rebuild", "data/raw", "--project", str(project), cwd=tmp_path, extra_env={"TMPDIR": str(temp)}
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "dvc repro exited" in done.stdout and "fetch.source" in done.stdout
    assert done.stdout.rstrip().endswith("verdict: failed (exit 1): dvc repro failed in the copy")
    assert list(temp.iterdir()) == []  # without --keep the copy and its log are gone
