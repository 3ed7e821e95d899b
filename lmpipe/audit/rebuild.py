"""`lmpipe audit --rebuild`: rerun the DAG in a fresh copy and say how close the bytes come.

Where the bytes cannot match (another CPU family, a GPU, `base.numerics: fast`), "the hashes
differ" is no answer. This reruns the stages that lead to a target in a temporary copy of the
project's sources (git-tracked and new non-ignored files, plus the data `dvc add`-ed beside
them; no output, no DVC cache, no MLflow store) and reports, per output that `dvc.lock` records:

- `identical`: the rebuilt md5 is the committed one;
- `different`/`missing`: it is not, or the rebuild did not write it;
- `timing`: a file under `reports/perf/` (seconds, tokens/s): the machine decides those bytes, so
  they never count.

When a non-timing output differs, every metric with a bootstrap CI in the committed
`reports/evaluate/metrics.json` (each model's accuracy, precision, recall, F1, ROC-AUC, ECE; the
paired accuracy differences) is compared with the rebuild's value. The verdict and exit code:

    identical  0  every output the same bytes
    within-ci  3  bytes differ; every rebuilt metric inside the committed run's CI
    beyond-ci  4  at least one rebuilt metric outside it (or absent)
    unjudged   5  bytes differ and no metric with a CI was rebuilt (a target short of evaluate)
    failed     1  `dvc repro` failed in the copy (the tail of its log is shown)

The copy runs `python -m dvc repro` with this interpreter's environment first on PATH and the
ambient environment otherwise unchanged (so `ATEN_CPU_CAPABILITY=default lmpipe audit --rebuild`
asks "does the record survive another kernel choice?"), minus `MLFLOW_TRACKING_URI`: its runs go
to the copy's own store, grouped as `rebuild-<UTC time>`.

The copy is the project as the committed run saw it, so that what a stage records about itself
(the git revision and dirty flag in `lineage.json`) comes out the same: its git HEAD is the
project's HEAD commit (with its history), and it keeps the committed `dvc.lock` (lineage leaves the
outputs it lists out of the dirty flag); `dvc repro --force` reruns every stage all the same. The
rebuilt hashes are computed from the files the rebuild wrote, not read from a lock.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TextIO

from lmpipe.core import numerics
from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import load_yaml, read_json
from lmpipe.core.lineage import dvc_md5, overlaps, read_lock, upstream_stages

TIMING_PREFIX = "reports/perf/"  # timing reports: the machine decides their bytes
EVAL_METRICS = "reports/evaluate/metrics.json"  # every model, every metric, with bootstrap CIs
PRETRAIN_HEADLINE = "reports/pretrain/headline.json"  # held-out perplexity (no CI: shown, not judged)
# Never copied, beside every output dvc.lock records: caches, stores, checkpoints (usually git-ignored anyway).
LEFT_BEHIND = (".dvc/cache/", ".dvc/tmp/", ".lmpipe/", "checkpoints/", "mlartifacts/", "mlruns/", "mlflow.db")
# Ambient settings that move floating-point results, shown with the machine.
NUMERIC_ENV = (*numerics.PORTABLE_ISA, *numerics.THREAD_VARS, "MKL_DYNAMIC", "OPENBLAS_L2_SIZE", "CUDA_VISIBLE_DEVICES")
EXIT_CODES = {"identical": 0, "failed": 1, "within-ci": 3, "beyond-ci": 4, "unjudged": 5}
LOG_TAIL = 40  # lines of a failed rebuild's log shown
EPS = 1e-12  # a value on a CI bound is inside it: bounds are bootstrap quantiles written as floats


@dataclass
class OutputCheck:
    """One output recorded in the committed dvc.lock against the rebuild's."""

    stage: str
    path: str
    committed: str | None
    rebuilt: str | None
    status: str  # identical | different | missing | timing


@dataclass
class MetricCheck:
    """A rebuilt metric against the committed run's bootstrap CI."""

    name: str  # <model>.<metric>, e.g. scratch.accuracy
    committed: float | None
    rebuilt: float | None
    ci_low: float | None
    ci_high: float | None
    status: str  # inside | outside | missing | no-ci (shown, never judged)


# --------------------------------------------------------------------------- pure comparisons
def compare_outputs(committed: dict[str, Any], now: dict[str, str | None], stages: list[str]) -> list[OutputCheck]:
    """Every output of `stages` in the committed lock (a `stages` mapping) against its rebuilt md5 (None: absent)."""
    checks = []
    for stage in stages:
        for out in committed.get(stage, {}).get("outs", []):
            path, md5 = out["path"], out.get("md5")
            if path.startswith(TIMING_PREFIX):
                status = "timing"
            elif now.get(path) is None:
                status = "missing"
            else:
                status = "identical" if now[path] == md5 else "different"
            checks.append(OutputCheck(stage, path, md5, now.get(path), status))
    return checks


def changed_inputs(committed: dict[str, Any], rebuilt: dict[str, Any], stages: list[str]) -> list[str]:
    """Sources (code, params, added data: inputs no stage writes) the rebuild ran with that the record did not.

    A non-empty answer means the workspace moved on since the committed run: the rebuild reran
    today's code, so its bytes say nothing about the record's reproducibility.
    """
    produced = [o["path"] for entry in committed.values() for o in entry.get("outs", [])]
    notes = []
    for stage in stages:
        was, now = committed.get(stage, {}), rebuilt.get(stage, {})
        if stage not in rebuilt:
            continue
        rebuilt_deps = {d["path"]: d.get("md5") for d in now.get("deps", [])}
        for dep in was.get("deps", []):
            path = dep["path"]
            if not any(overlaps(path, p) for p in produced) and rebuilt_deps.get(path) != dep.get("md5"):
                notes.append(f"{stage}: {path} differs from the record")
        for file, values in was.get("params", {}).items():
            for key, value in values.items():
                if now.get("params", {}).get(file, {}).get(key) != value:
                    notes.append(f"{stage}: param {key} differs from the record")
    return sorted(set(notes))


def _ci_bounds(row: dict[str, Any], key: str) -> tuple[Any, Any] | None:
    """The CI of `key`: `<key>_ci_low/high`, or `<prefix>_ci_low/high` for a paired `<prefix>_accuracy_diff`."""
    if key.endswith(("_ci_low", "_ci_high")):
        return None
    bases = [key, key.removesuffix("_accuracy_diff")] if key.endswith("_accuracy_diff") else [key]
    for base in bases:
        if f"{base}_ci_low" in row and f"{base}_ci_high" in row:
            return row[f"{base}_ci_low"], row[f"{base}_ci_high"]
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def compare_metrics(committed: dict[str, Any], rebuilt: dict[str, Any]) -> list[MetricCheck]:
    """Every metric that has a CI in the committed metrics.json, its rebuilt value against that CI.

    Metrics without a CI (McNemar counts, temperatures, perplexity) are skipped: nothing to judge
    them by. A metric the rebuild lacks, or whose value is not a number, is `missing`.
    """
    checks = []
    for model, row in sorted(committed.items()):
        if not isinstance(row, dict):
            continue
        for key in sorted(row):
            bounds = _ci_bounds(row, key)
            if bounds is None or _number(row[key]) is None:  # e.g. ensemble.vs_best_member: a model's name
                continue
            low, high = _number(bounds[0]), _number(bounds[1])
            if low is None or high is None:
                continue
            other = rebuilt.get(model)
            value = _number(other.get(key)) if isinstance(other, dict) else None
            if value is None:
                status = "missing"
            else:
                status = "inside" if low - EPS <= value <= high + EPS else "outside"
            checks.append(MetricCheck(f"{model}.{key}", _number(row[key]), value, low, high, status))
    return checks


def compare_perplexity(committed: dict[str, Any], rebuilt: dict[str, Any]) -> list[MetricCheck]:
    """The pretrain headline's perplexity, shown beside the judged metrics (it carries no CI)."""
    if "ppl" not in committed and "ppl" not in rebuilt:
        return []
    was, now = _number(committed.get("ppl")), _number(rebuilt.get("ppl"))
    return [MetricCheck("pretrain.ppl", was, now, None, None, "no-ci")]


def verdict(outputs: list[OutputCheck], metrics: list[MetricCheck]) -> str:
    """identical | within-ci | beyond-ci | unjudged (see the module docstring); timing files never count."""
    if all(o.status in ("identical", "timing") for o in outputs):
        return "identical"
    judged = [m for m in metrics if m.status != "no-ci"]
    if not judged:
        return "unjudged"
    return "within-ci" if all(m.status == "inside" for m in judged) else "beyond-ci"


def exit_code(result: str) -> int:
    return EXIT_CODES[result]


# --------------------------------------------------------------------------- the record and the copy
def stages_for(lock: dict[str, Any], target: str) -> tuple[list[str], list[str]]:
    """(the stages that write `target`: `dvc repro` targets; every stage they need, in dvc.lock order)."""
    writers = [name for name, entry in lock.items() if any(overlaps(target, o["path"]) for o in entry.get("outs", []))]
    if not writers:
        known = sorted({o["path"] for e in lock.values() for o in e.get("outs", [])})
        raise LmpipeError(f"{target}: no stage in dvc.lock produced it (outputs: {known})")
    return writers, upstream_stages(lock, [target])


def judge_files(root: Path, lock: dict[str, Any], stages: list[str]) -> None:
    """The committed files the verdict reads must be the ones dvc.lock records, else the CIs are not the record's."""
    recorded = {o["path"]: o.get("md5") for s in stages for o in lock[s].get("outs", [])}
    for path in (EVAL_METRICS, PRETRAIN_HEADLINE):
        if path in recorded and (root / path).is_file() and dvc_md5(root / path) != recorded[path]:
            raise LmpipeError(
                f"{root / path}: not the file dvc.lock records ({recorded[path]}): its CIs are not the committed "
                f"run's (restore it with `git checkout -- {path}`, or run `lmpipe audit`)"
            )


def _listed(root: Path) -> list[str]:
    try:
        done = subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, capture_output=True, check=True
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        raise LmpipeError(f"{root}: not a git repository (--rebuild copies its git-tracked sources): {exc}") from exc
    return [p for p in done.stdout.decode().split("\0") if p]


def _git(*args: str, cwd: Path) -> None:
    quiet = ["-c", "user.name=lmpipe", "-c", "user.email=lmpipe@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", *quiet, "-c", "core.hooksPath=/dev/null", *args], cwd=cwd, capture_output=True, check=True)


def rebuilt_md5s(root: Path, lock: dict[str, Any], stages: list[str]) -> dict[str, str | None]:
    """The DVC md5 of every output of `stages` as it lies in `root` now (None: absent)."""
    paths = [o["path"] for s in stages for o in lock.get(s, {}).get("outs", [])]
    return {p: dvc_md5(root / p) if (root / p).exists() else None for p in paths}


def _same_head(root: Path, dest: Path) -> str | None:
    """Make `dest` a git repo whose HEAD is `root`'s HEAD commit (with its history); None, or why it could not."""
    _git("init", "-q", cwd=dest)
    try:
        # the whole history: lineage records the last commit that changed the sources (code_state)
        _git("fetch", "-q", "--no-tags", root.resolve().as_uri(), "HEAD", cwd=dest)
        _git("reset", "-q", "FETCH_HEAD", cwd=dest)
        return None
    except subprocess.CalledProcessError as exc:  # no commit yet, or git refuses the folder: a commit of its own
        _git("add", "-A", cwd=dest)
        _git("commit", "-qm", "lmpipe audit --rebuild: the sources", cwd=dest)
        why = exc.stderr.decode(errors="replace").strip().splitlines() if exc.stderr else []
        return (
            f"the copy could not take {root}'s git HEAD ({why[-1] if why else 'git fetch failed'}): "
            "what stages record of the revision (lineage.json) will differ"
        )


def copy_sources(root: Path, dest: Path, lock: dict[str, Any]) -> tuple[int, str | None]:
    """Copy the sources of `root` and its dvc.lock into `dest`, a git repo at `root`'s HEAD.

    Returns the number of files copied and, when the copy could not take `root`'s HEAD, why.

    Every output dvc.lock records, and LEFT_BEHIND, stay behind; data a `.dvc` file tracks
    (`dvc add`-ed user data, not in git) is copied beside its `.dvc` file.
    """
    outs = [o["path"] for e in lock.values() for o in e.get("outs", [])]
    count = 0
    for rel in sorted({*_listed(root), "dvc.lock"}):
        if rel.startswith(LEFT_BEHIND) or any(overlaps(rel, p) for p in outs) or not (root / rel).is_file():
            continue
        paths = [rel]
        if rel.endswith(".dvc"):
            tracked = (load_yaml((root / rel).read_text(encoding="utf-8")) or {}).get("outs", [])
            paths += [(Path(rel).parent / o["path"]).as_posix() for o in tracked if "path" in o]
        for path in paths:
            src, dst = root / path, dest / path
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, dirs_exist_ok=True)
            elif src.is_file():
                shutil.copy2(src, dst)
            count += 1
    return count, _same_head(root, dest)


def rebuild_env(group: str) -> dict[str, str]:
    """The ambient environment, this interpreter's bin first on PATH, the copy's own MLflow store, the run group."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["LMPIPE_RUN_GROUP"] = group
    return env


def run_repro(copy: Path, targets: list[str], log: Path, env: dict[str, str], stream: TextIO | None) -> int:
    """`python -m dvc repro --force TARGETS` in the copy: every stage on the way reruns; its log to `log`, `stream`."""
    cmd = [sys.executable, "-m", "dvc", "repro", "--force", "--no-run-cache", *targets]
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            out.write(line)
            if stream is not None:
                stream.write(line)
                stream.flush()
        return proc.wait()


# --------------------------------------------------------------------------- the machine
def machine(params_file: Path) -> dict[str, Any]:
    """Who rebuilt: CPU model, architecture, cores, GPU, torch, `base.numerics`, the numeric env vars set."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
        try:
            names = subprocess.run(query, capture_output=True, text=True, timeout=30, check=False).stdout.split("\n")
        except (OSError, subprocess.SubprocessError):
            names = []
        gpu = ", ".join(n.strip() for n in names if n.strip()) or None
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = None
    params = load_yaml(params_file.read_text(encoding="utf-8")) if params_file.is_file() else {}
    base = (params or {}).get("base") or {}
    return {
        "cpu": cpu,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch,
        "numerics": base.get("numerics") if isinstance(base, dict) else None,
        "env": {k: os.environ[k] for k in NUMERIC_ENV if k in os.environ},
    }


# --------------------------------------------------------------------------- the whole check
def _json_or_empty(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def judge(committed_root: Path, rebuilt_root: Path, stages: list[str]) -> dict[str, Any]:
    """Compare the rebuild in `rebuilt_root` with the record in `committed_root` (both project folders)."""
    committed, rebuilt = read_lock(committed_root), read_lock(rebuilt_root)
    outputs = compare_outputs(committed, rebuilt_md5s(rebuilt_root, committed, stages), stages)
    rerun = {o.path for o in outputs}  # metrics files only count when the rebuild was meant to write them
    metrics: list[MetricCheck] = []
    if any(o.status in ("different", "missing") for o in outputs):
        if EVAL_METRICS in rerun:
            was, now = (_json_or_empty(r / EVAL_METRICS) for r in (committed_root, rebuilt_root))
            metrics += compare_metrics(was, now)
        if PRETRAIN_HEADLINE in rerun:
            was, now = (_json_or_empty(r / PRETRAIN_HEADLINE) for r in (committed_root, rebuilt_root))
            metrics += compare_perplexity(was, now)
    result = verdict(outputs, metrics)
    evaluate = committed.get("evaluate", {}).get("params", {}).get("params.yaml", {}).get("evaluate", {})
    return {
        "verdict": result,
        "exit_code": exit_code(result),
        "confidence": evaluate.get("confidence") if isinstance(evaluate, dict) else None,
        "stages": stages,
        "changed_inputs": changed_inputs(committed, rebuilt, stages),
        "outputs": [asdict(o) for o in outputs],
        "metrics": [asdict(m) for m in metrics],
    }


def _workdir(workdir: str | Path | None) -> tuple[Path, bool]:
    """(the folder to rebuild in, whether this call created it); a given folder must be new or empty."""
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix="lmpipe-rebuild-")), True
    path = Path(workdir).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise LmpipeError(f"{path}: --workdir must be a new or empty folder")
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    return path, created


def rebuild(
    root: Path, target: str, workdir: str | Path | None = None, keep: bool = False, stream: TextIO | None = None
) -> dict[str, Any]:
    """Rerun what `target` needs in a fresh copy of `root`'s sources and judge it against `root`'s record."""
    lock = read_lock(root)
    if not lock:
        raise LmpipeError(f"{root / 'dvc.lock'}: not found or empty: no committed run to compare with")
    targets, stages = stages_for(lock, target)
    judge_files(root, lock, stages)
    work, created = _workdir(workdir)
    copy, log = work / "project", work / "rebuild.log"
    started = datetime.now(UTC)
    try:
        copy.mkdir()
        files, head_note = copy_sources(root, copy, lock)
        group = f"rebuild-{started.strftime('%Y%m%dT%H%M%SZ')}"
        code = run_repro(copy, targets, log, rebuild_env(group), stream)
        if code != 0:
            tail = list(deque(log.read_text(encoding="utf-8", errors="replace").splitlines(), maxlen=LOG_TAIL))
            report = {"verdict": "failed", "exit_code": EXIT_CODES["failed"], "stages": stages, "repro_exit": code}
            report["log_tail"] = tail
        else:
            report = judge(root, copy, stages)
        report.update(
            target=target,
            targets=targets,
            files_copied=files,
            notes=[head_note] if head_note else [],
            run_group=group,
            seconds=round((datetime.now(UTC) - started).total_seconds(), 1),
            machine=machine(copy / "params.yaml"),
            workdir=str(work),
            kept=keep,
        )
        return report
    finally:
        if not keep:
            shutil.rmtree(copy, ignore_errors=True)
            log.unlink(missing_ok=True)
            if created:
                shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the report
def _short(md5: str | None) -> str:
    return "-" if not md5 else md5[:8] + (".dir" if md5.endswith(".dir") else "")


def _value(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


SUMMARY = {
    "identical": "every output has the bytes dvc.lock records",
    "within-ci": "bytes differ; every rebuilt metric lies inside the committed run's bootstrap CI",
    "beyond-ci": "bytes differ and a rebuilt metric lies outside the committed run's bootstrap CI",
    "unjudged": "bytes differ and no metric with a committed CI was rebuilt (the target stops before evaluate)",
    "failed": "dvc repro failed in the copy",
}


def _metric_line(x: dict[str, Any]) -> str:
    judged = f"CI [{_value(x['ci_low'])}, {_value(x['ci_high'])}]" if x["status"] != "no-ci" else "no CI: not judged"
    mark = "" if x["status"] in ("inside", "no-ci") else f"  {x['status'].upper()}"
    return f"  {x['name']:<40} {_value(x['rebuilt'])}  committed {_value(x['committed'])}  {judged}{mark}"


def format_rebuild(report: dict[str, Any]) -> str:
    """The human-readable rebuild audit: the machine, one line per output, one per metric, the verdict."""
    m = report["machine"]
    env = " ".join(f"{k}={v}" for k, v in m["env"].items()) or "none set"
    lines = [
        f"rebuild of {report['target']}: dvc repro {' '.join(report['targets'])} ({len(report['stages'])} stages, "
        f"{report['seconds']:.0f} s) in {report['workdir']} ({'kept' if report['kept'] else 'removed'})",
        f"machine: {m['cpu']} ({m['arch']}, {m['cores']} cores{', GPU ' + m['gpu'] if m['gpu'] else ''}), "
        f"python {m['python']}, torch {m['torch']}, base.numerics {m['numerics'] or '-'}; numeric env: {env}",
    ]
    if report["verdict"] == "failed":
        lines += [f"dvc repro exited {report['repro_exit']}; the last lines of its log:"]
        lines += [f"  {line}" for line in report["log_tail"]]
    else:
        lines += [f"note: {n}" for n in report["notes"]]
        lines += [f"note: {n} (the rebuild ran today's workspace, not the record's)" for n in report["changed_inputs"]]
        lines += ["", f"{'output':<44} {'committed':<14} {'rebuilt':<14} status"]
        for o in report["outputs"]:
            status = {"identical": "identical", "timing": "timing (not judged)"}.get(o["status"], o["status"].upper())
            lines.append(f"{o['path']:<44} {_short(o['committed']):<14} {_short(o['rebuilt']):<14} {status}")
        if report["metrics"]:
            level = f"{report['confidence']:.0%} " if report.get("confidence") else ""
            lines += ["", f"metrics (rebuilt value against the committed run's {level}bootstrap CI):"]
            lines += [_metric_line(x) for x in report["metrics"]]
    lines += ["", f"verdict: {report['verdict']} (exit {report['exit_code']}): {SUMMARY[report['verdict']]}"]
    return "\n".join(lines)
