"""SIGKILL a real `dvc repro` at seeded points of training, rerun it, compare every model's md5.

    python -m tests.integration.chaos             # what `make chaos` runs: 10 kill points, seed 10
    python -m tests.integration.chaos --n 3 --seed 7 --keep

The helpers here also serve tests/integration/test_chaos.py (three kill points in `make test`).
A kill point is a training stage, a checkpoint step and a delay: `dvc repro` runs in its own
process group until that stage's `checkpoint.pt` of at least that step has been written by this
run (intact: its `.sha256` matches), then, after the delay, the whole group gets SIGKILL. The
next `dvc repro` resumes from the checkpoint left on disk (lmpipe.train.training) and must
write the same bytes as an uninterrupted run: every output under models/ and data/ has the md5
of the uninterrupted run's dvc.lock (models/export file by file, less its lineage.json and model
card, which record the run: git revision, report md5s). reports/ and checkpoints/ hold timings
and markers and are not compared. Nothing here asserts on wall-clock time: a timeout only ends a wait.

`make chaos` runs the DAG once uninterrupted on a project copy (the reference), then for each
kill point removes the killed stage's model and checkpoints (so it trains from step 0), kills a
`dvc repro` at the point, reruns `dvc repro` to completion and prints one table row.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmpipe.core.lineage import read_lock
from tests.integration.conftest import copy_project, env

TRAINING_STAGES = ("pretrain", "finetune@scratch", "finetune@random")
COMPARED = ("models/", "data/")  # reports/ and checkpoints/ hold timings and markers
EXPORT, RECORD_FILES = "models/export", ("lineage.json", "README.md")
RWLOCK = ".dvc/tmp/rwlock"
POLL_S = 0.05
WAIT_S = 600.0  # ends a wait for a kill point that never comes (the run then goes on to the end)


def checkpoint_dir(stage: str) -> str:
    return "checkpoints/pretrain" if stage == "pretrain" else f"checkpoints/finetune/{stage.split('@', 1)[1]}"


def model_dir(stage: str) -> str:
    return "models/pretrained" if stage == "pretrain" else f"models/finetuned/{stage.split('@', 1)[1]}"


def checkpoint_steps(stage: str, params: dict[str, Any]) -> list[int]:
    """The steps at which `stage` writes checkpoint.pt under `params` (every checkpoint_every and the last)."""
    if stage == "pretrain":
        loop = params["pretrain"]["loop"]
        last, every = loop["max_steps"], loop["checkpoint_every"]
    else:
        last = params["finetune"]["backbones"][stage.split("@", 1)[1]]["max_steps"]
        every = params["finetune"]["checkpoint_every"]
    return sorted({*range(every, last + 1, every), last})


def output_md5s(path: Path) -> dict[str, str]:
    """{out path: md5} of every output under models/ and data/ in `path`'s dvc.lock.

    models/export is taken file by file, less its RECORD_FILES: they record the run (the copy's
    git revision, the md5 of every upstream report, timings included), not the model, so no two
    runs share them, killed or not.
    """
    md5s = {
        out["path"]: out["md5"]
        for entry in read_lock(path).values()
        for out in entry.get("outs", ())
        if out["path"].startswith(COMPARED)
    }
    if md5s.pop(EXPORT, None) is not None:
        for file in sorted((path / EXPORT).rglob("*")):
            if file.is_file() and file.name not in RECORD_FILES:
                md5s[file.relative_to(path).as_posix()] = hashlib.md5(file.read_bytes()).hexdigest()
    return md5s


def intact_step(folder: Path) -> int | None:
    """The step of the checkpoint in `folder` when it is intact (its sha256 file matches), else None."""
    try:
        expected = (folder / "checkpoint.pt.sha256").read_text().split()[0]
        data = (folder / "checkpoint.pt").read_bytes()
    except (OSError, IndexError):
        return None
    if hashlib.sha256(data).hexdigest() != expected:
        return None  # written, its hash not yet (or a newer one mid-write)
    import torch

    return int(torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)["step"])


def resumed_steps(log: str) -> dict[str, int]:
    """{checkpoint folder: step} of every "resuming from" line in a run's log."""
    found = re.findall(r"resuming from (\S+)/checkpoint\.pt at step (\d+)", log)
    return {folder: int(step) for folder, step in found}


@dataclass(frozen=True)
class KillPoint:
    stage: str
    step: int  # kill once this run wrote a checkpoint of at least this step...
    delay: float  # ...and this many seconds more went by

    def __str__(self) -> str:
        return f"{self.stage} ckpt>={self.step} +{self.delay:.2f}s"


@dataclass
class Kill:
    point: KillPoint
    reached: bool  # the checkpoint came (else the kill came when the stage finished, or the run ended)
    returncode: int | None  # of the killed `dvc repro`: -9 is SIGKILL
    on_disk: int | None  # step of the intact checkpoint left behind, None when there is none
    finished: bool  # this run wrote the stage's finished marker before the kill (it had completed)
    corrupt_rwlock: bool  # the kill left DVC's .dvc/tmp/rwlock corrupt (removed: heal_rwlock)
    log: str = field(repr=False)


def heal_rwlock(path: Path) -> bool:
    """Remove `.dvc/tmp/rwlock` when it is not JSON; True when it was removed.

    DVC rewrites that file in place (truncate, then write: dvc/rwlock.py), so a SIGKILL between
    the two, while DVC starts or ends a stage, leaves it empty, and every later `dvc` command
    fails ("Unable to read RWLock-file ... JSON structure is corrupted") until it is removed by
    hand. No other `dvc` runs in the copy, so removing it is safe here; callers report it.
    """
    file = path / RWLOCK
    try:
        json.loads(file.read_text())
        return False
    except FileNotFoundError:
        return False
    except (OSError, ValueError):
        file.unlink()
        return True


def start_repro(path: Path, log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=path,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: dvc, the stage and its workers die together
        )


def _written_since(file: Path, ns: int) -> bool:
    try:
        return file.stat().st_mtime_ns >= ns
    except OSError:
        return False


def repro_and_kill(path: Path, point: KillPoint, log: Path, wait_s: float = WAIT_S) -> Kill:
    """Run `dvc repro` in `path` and SIGKILL its process group at `point`."""
    import torch  # noqa: F401  (imported now: the first poll must not take seconds on a loaded machine)

    folder = path / checkpoint_dir(point.stage)
    started = time.time_ns()
    proc = start_repro(path, log)
    reached, seen = False, None
    deadline = time.monotonic() + wait_s
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                stat = (folder / "checkpoint.pt.sha256").stat()
            except OSError:
                stat = None
            if stat is not None and stat.st_mtime_ns >= started and (stat.st_ino, stat.st_mtime_ns) != seen:
                seen = (stat.st_ino, stat.st_mtime_ns)
                step = intact_step(folder)
                if step is not None and step >= point.step:
                    reached = True
                    break
            if _written_since(folder / "finished.json", started):
                break  # the stage completed before the point: killed here, at its end
            time.sleep(POLL_S)
        if reached:
            time.sleep(point.delay)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return Kill(
        point=point,
        reached=reached,
        returncode=proc.returncode,
        on_disk=intact_step(folder),
        finished=_written_since(folder / "finished.json", started),
        corrupt_rwlock=heal_rwlock(path),
        log=log.read_text(errors="replace"),
    )


def repro(path: Path, log: Path, timeout: float = 1800) -> None:
    """`dvc repro` in `path` to the end (a RuntimeError with the log's tail when it fails)."""
    with open(log, "ab") as out:
        done = subprocess.run(
            [sys.executable, "-m", "dvc", "repro"],
            cwd=path,
            env=env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if done.returncode != 0:
        raise RuntimeError(f"dvc repro exited {done.returncode}:\n{log.read_text(errors='replace')[-6000:]}")


def seed_from(reference: Path, dest: Path, stages: list[str]) -> None:
    """Give `dest` (a copy_project copy on the same params) `reference`'s finished `stages`.

    Their outputs are copied, their dvc.lock entries written, and the reference's cache objects
    hard-linked (DVC never rewrites an object); the run cache stays behind, so every other stage
    really runs.
    """
    lock = yaml.safe_load((reference / "dvc.lock").read_text())["stages"]
    for stage in stages:
        for out in lock[stage]["outs"]:
            src, dst = reference / out["path"], dest / out["path"]
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            else:
                shutil.copy2(src, dst)
    files = reference / ".dvc/cache/files"
    if files.is_dir():
        shutil.copytree(files, dest / ".dvc/cache/files", copy_function=os.link, dirs_exist_ok=True)
    (dest / "dvc.lock").write_text(
        yaml.safe_dump({"schema": "2.0", "stages": {s: lock[s] for s in stages}}, sort_keys=False)
    )


def draw_points(n: int, seed: int, params: dict[str, Any]) -> list[KillPoint]:
    """`n` kill points from `seed`: a training stage, one of its checkpoint steps, a delay under 1.5 s."""
    rng = random.Random(seed)
    points = []
    for _ in range(n):
        stage = rng.choice(TRAINING_STAGES)
        points.append(KillPoint(stage, rng.choice(checkpoint_steps(stage, params)), round(rng.uniform(0, 1.5), 2)))
    return points


def resumed_label(kill: Kill, rerun_log: str) -> str:
    step = resumed_steps(rerun_log).get(checkpoint_dir(kill.point.stage))
    if step is not None:
        return f"from step {step}"
    if kill.finished:
        return "no (stage had finished)"
    return "no (step 0)" if kill.on_disk is None else "NO"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=10, help="kill points (default 10)")
    parser.add_argument("--seed", type=int, default=10, help="seed of the kill points (default 10)")
    parser.add_argument("--keep", action="store_true", help="keep the project copy (its path is printed)")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="lmpipe-chaos-"))
    path = copy_project(work / "project")
    logs = work / "logs"
    logs.mkdir()
    params = yaml.safe_load((path / "params.yaml").read_text())
    points = draw_points(args.n, args.seed, params)
    print(f"project copy {path} (tiny params of tests/integration/conftest.py); seed {args.seed}", flush=True)
    start = time.monotonic()
    repro(path, logs / "reference.log")
    reference = output_md5s(path)
    print(
        f"reference: uninterrupted dvc repro in {time.monotonic() - start:.0f} s, {len(reference)} outputs", flush=True
    )

    rows, failed = [], 0
    for i, point in enumerate(points, 1):
        for rel in (model_dir(point.stage), checkpoint_dir(point.stage)):  # the stage trains again from step 0
            shutil.rmtree(path / rel, ignore_errors=True)
        kill = repro_and_kill(path, point, logs / f"{i:02d}-killed.log")
        rerun_log = logs / f"{i:02d}-rerun.log"
        start = time.monotonic()
        try:
            repro(path, rerun_log)
            now = output_md5s(path)
            differ = sorted(p for p in reference if now.get(p) != reference[p])
            match = "yes" if not differ else "NO: " + ", ".join(differ)
        except RuntimeError as exc:
            match = f"NO: rerun failed ({str(exc).splitlines()[0]})"
        failed += match != "yes"
        match += " (after removing the corrupt .dvc/tmp/rwlock)" if kill.corrupt_rwlock else ""
        at_kill = "finished" if kill.finished else ("no ckpt" if kill.on_disk is None else f"ckpt {kill.on_disk}")
        rows.append(
            [
                str(i),
                str(point) if kill.reached else f"{point} (not reached)",
                at_kill,
                str(kill.returncode),
                resumed_label(kill, rerun_log.read_text(errors="replace")),
                f"{time.monotonic() - start:.0f}",
                match,
            ]
        )
        print(f"  {i}/{len(points)} {point}: {match}", flush=True)

    header = ["#", "kill point (stage, checkpoint step, delay)", "on disk", "exit", "rerun resumed", "rerun s", "md5s"]
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    print()
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    print(
        f"\n{len(rows) - failed}/{len(rows)} reruns matched the uninterrupted run's md5 of every model and data output"
    )
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
