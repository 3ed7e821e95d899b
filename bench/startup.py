"""Stage start-up: seconds from process start to the start of the work, now vs before the lazy tracker.

The three stages that need no transformer (fetch, preprocess, baseline) run as a small pipeline
in a scratch project (temp folder: its own params.yaml with `fetch.source: file`, a CSV sample,
its own SQLite MLflow store, created before any clock starts). Each stage runs as
`python -c WRAPPER <code dir> stages.NAME`, the wrapper being `runpy` of the stage module with
`lmpipe.core.tracking.stage_run` wrapped so the process prints the time at which the stage's
work begins (the body of `stage_run`, the same moment `lmpipe.core.stage.work_started` logs).
The clock starts in the parent just before it spawns the process, so start-up includes the
interpreter, the imports, the params, the input checks and whatever the tracker does first.

Sides (each in its own process, interleaved):
- `ours`: the code of this checkout, where the MLflow run opens in a background thread.
- `before`: the same three stages at `peer_rev` (the commit before this change, extracted with
  `git archive`), where opening the run (importing MLflow, the store, the git state and input
  hashes, the housekeeping) came before the work.
- `floor`: a process that imports `lmpipe.core.params` and validates params.yaml, then stops:
  what any stage that reads its params must pay (reported in the notes).
Rows: start-up per stage (ours vs before) and wall time to exit per stage. Both sides must write
the same bytes (DVC md5 of data/raw, data/processed, models/baseline), or the run fails.

Text: the first `rows` reviews of `data/raw/a1_IMDB_Dataset.csv` when it exists, else generated.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common

MODULE = "bench.startup"
IMDB = Path("data/raw/a1_IMDB_Dataset.csv")
STAGES = ("fetch", "preprocess", "baseline")
SIDES = ("ours", "before", "floor")
OUTPUTS = ("data/raw", "data/processed", "models/baseline")
PEER_REV = "4521276ff480930de9e08b202af052fbab328937"  # main just before the tracker opened in the background
MARK = "LMPIPE-BENCH work starts at"
WRAPPER = f"""
import contextlib, runpy, sys, time
sys.path.insert(0, sys.argv[1])
module = sys.argv[2]
if module == "floor":
    from lmpipe.core.params import load_params
    load_params()
    print("{MARK}", repr(time.time()), flush=True)
    raise SystemExit(0)
import lmpipe.core.tracking as tracking
original = tracking.stage_run
@contextlib.contextmanager
def timed(*args, **kwargs):
    with original(*args, **kwargs) as tracker:
        print("{MARK}", repr(time.time()), flush=True)
        yield tracker
tracking.stage_run = timed
sys.argv = [module]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""
WORDS = "a great moving story but the acting felt wooden while the score soared I loved it not".split()


def default_config(quick: bool = False) -> dict[str, Any]:
    config = {"peer_rev": PEER_REV, "rows": 5000, "tracking": "sqlite", "seed": 0}
    if quick:
        config.update(rows=60, tracking="unreachable")  # quick: no MLflow store (checks the code only)
    return config


def write_sample(path: Path, rows: int, seed: int) -> str:
    """The first `rows` IMDB reviews (text, label) as a CSV, else generated ones; where they came from."""
    path.parent.mkdir(parents=True, exist_ok=True)
    source = common.ROOT / IMDB
    with open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        if source.is_file():
            with open(source, newline="", encoding="utf-8") as handle:
                for i, record in enumerate(csv.DictReader(handle)):
                    if i == rows:
                        break
                    writer.writerow([record["review"], record["sentiment"]])
            return f"first {rows} reviews of {IMDB}"
        rng = random.Random(seed)
        for i in range(rows):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
            writer.writerow([f"{i} {text}", "positive" if i % 2 else "negative"])
    return f"{rows} generated reviews ({IMDB} missing)"


def code_at(rev: str, dest: Path) -> Path:
    """The project's files at git revision `rev`, extracted into `dest` (`git archive`)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=common.ROOT, capture_output=True)
    if archive.returncode != 0:
        raise RuntimeError(f"bench.startup: git revision {rev!r} not found ({archive.stderr.decode().strip()})")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def scratch_project(code: Path, dest: Path, config: dict[str, Any]) -> tuple[Path, dict[str, str]]:
    """A project folder that runs fetch -> preprocess -> baseline on a CSV sample; its environment."""
    dest.mkdir(parents=True, exist_ok=True)
    params = (code / "params.yaml").read_text(encoding="utf-8")
    params, found = re.subn(r"(?m)^(\s+source:\s*)imdb\b", r"\g<1>file", params, count=1)
    if not found:
        raise RuntimeError(f"{code / 'params.yaml'}: no `fetch.source: imdb` line to switch to `file`")
    (dest / "params.yaml").write_text(params, encoding="utf-8")
    write_sample(dest / "userdata" / "dataset.csv", config["rows"], config["seed"])
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env.update(common.CHILD_ENV)
    env["LMPIPE_RUN_GROUP"] = "bench-startup"
    if config["tracking"] == "sqlite":
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{dest / 'mlflow.db'}"
        from mlflow.tracking import MlflowClient  # create the store before any clock starts

        MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    else:
        env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"  # nothing listens: the run is journaled
    return dest, env


def time_process(code: Path, project: Path, env: dict[str, str], module: str) -> tuple[float, float]:
    """(seconds from spawn to the start of the work, seconds from spawn to exit) of one stage process."""
    started = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(code), module],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    ended = time.time()
    mark = re.search(rf"^{MARK} ([0-9.]+)$", proc.stdout, re.M)
    if proc.returncode != 0 or mark is None:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"{module} in {project} failed (exit {proc.returncode}):\n{tail}")
    return float(mark.group(1)) - started, ended - started


def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} (got {side!r})")
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-startup-") as tmp:
        code = common.ROOT if side != "before" else code_at(config["peer_rev"], Path(tmp) / "code")
        project, env = scratch_project(code, Path(tmp) / "project", config)
        result: dict[str, Any] = {"side": side, "startup_s": {}, "wall_s": {}}
        for stage in STAGES if side != "floor" else ("floor",):
            module = "floor" if side == "floor" else f"stages.{stage}"
            startup, wall = time_process(code, project, env, module)
            result["startup_s"][stage], result["wall_s"][stage] = startup, wall
        if side != "floor":  # the same work on both sides: the same output bytes
            from lmpipe.core.lineage import dvc_md5

            result["outputs"] = {out: dvc_md5(project / out) for out in OUTPUTS}
    result["summary"] = ", ".join(f"{k} {v:.2f} s" for k, v in result["startup_s"].items())
    return result


def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs = common.interleave(MODULE, SIDES, config, repeats, common.log)
    outputs = {json.dumps(r["outputs"], sort_keys=True) for side in ("ours", "before") for r in runs[side]}
    if len(outputs) != 1:
        raise RuntimeError(f"ours and {config['peer_rev'][:7]} wrote different outputs: not comparable {outputs}")

    def med(side: str, kind: str, stage: str) -> float:
        return round(common.median([r[kind][stage] for r in runs[side]]), 3)

    floor = med("floor", "startup_s", "floor")
    rows = []
    for stage in STAGES:
        rows.append(
            common.row(
                "startup",
                f"{stage}: start of work",
                "lmpipe (tracker opens in the background)",
                f"lmpipe at {config['peer_rev'][:7]} (tracker first)",
                med("ours", "startup_s", stage),
                med("before", "startup_s", stage),
                "s",
                "lower",
                f"floor (python + load params.yaml) {floor:.2f} s; {common.load_note(runs)}",
            )
        )
    for stage in STAGES:
        rows.append(
            common.row(
                "startup",
                f"{stage}: process wall time",
                "lmpipe",
                f"lmpipe at {config['peer_rev'][:7]}",
                med("ours", "wall_s", stage),
                med("before", "wall_s", stage),
                "s",
                "lower",
                f"spawn to exit, run closed in MLflow; {common.load_note(runs)}",
            )
        )
    what = (
        f"fetch (source: file) -> preprocess -> baseline on {config['rows']} IMDB reviews in a scratch project "
        f"with its own {config['tracking']} MLflow store; seconds from spawn to the body of stage_run"
    )
    return {"benchmark": "startup", "description": what, "rows": rows, "runs": runs}


if __name__ == "__main__":
    raise SystemExit(common.main(MODULE, run_side, orchestrate, default_config))
