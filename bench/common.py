"""What every benchmark shares: one side per fresh subprocess, interleaved runs, medians, rows.

A benchmark module `bench.NAME` has two entry points:

- `python -m bench.NAME --side SIDE --config JSON --out FILE`: runs ONE side (ours or a peer)
  in this fresh process and writes its measurements (plus this process's peak RSS and the load
  average when it started) to FILE. `run_side(side, config)` is the same thing in-process (the
  unit test calls it with a micro configuration).
- `python -m bench.NAME [--quick] [--repeats N] [--out FILE]`: the orchestrator. It runs the
  sides interleaved, `ours, peer, ours, peer` (`repeats` rounds), each in its own subprocess,
  so both see the same drift in machine load; it reports the median of each side and the ratio
  ours / peer. `bench.run` calls this for every benchmark and renders the table.

Nothing here times anything by wall-clock threshold: benchmarks report, they never assert.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2  # the reference machine's cores; every side pins torch / ORT to it
HIGH_LOAD = 2.0  # 1-minute load average above the core count: other work shares the CPUs
# Threading knobs inherited by every side when set; recorded with the results. On a shared,
# oversubscribed machine, spinning worker threads (torch's libgomp, ONNX Runtime's pool) waste
# their time slices waiting for a descheduled sibling: `bench.run --no-spin` sets NO_SPIN_ENV
# (libgomp threads sleep instead of spinning; bench.inference also turns off ORT's spinning).
THREAD_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LMPIPE_BENCH_NO_SPIN")
NO_SPIN_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "LMPIPE_BENCH_NO_SPIN": "1"}

CHILD_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "true",
    "PYTHONHASHSEED": "0",
}


def no_spin() -> bool:
    """True under `bench.run --no-spin` (LMPIPE_BENCH_NO_SPIN=1 in the environment)."""
    return os.environ.get("LMPIPE_BENCH_NO_SPIN") == "1"


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (what `uptime` prints), rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(ours: float, peer: float) -> float | None:
    return round(ours / peer, 3) if peer else None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict[str, Any]:
    """CPU model, cores, thread setting, library versions, load average now."""
    import importlib.metadata as md

    versions = {}
    for name in ("torch", "transformers", "tokenizers", "onnxruntime", "accelerate"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": THREADS,
        "python": platform.python_version(),
        "versions": versions,
        "load_average_at_start": load_average(),
        "thread_env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
        "numerics": numerics_env(),  # what every side runs under unless its config names a mode
    }


# --------------------------------------------------------------------------- one side per process
def numerics_env(mode: str | None = None) -> dict[str, str]:
    """The variables lmpipe.core.numerics sets for `mode` (default: params.yaml `base.numerics`), so
    a side runs the kernels the pipeline runs; they must be in the child's environment at start."""
    from lmpipe.core import numerics
    from lmpipe.core.params import load_params

    return numerics.pinned_env(mode or load_params(ROOT / "params.yaml").base.numerics, THREADS)


def run_child(module: str, side: str, config: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run `python -m <module> --side <side>` in a fresh process; return what it measured.

    The load average just before it starts is recorded as `load_before`.
    """
    load = load_average()
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, "--side", side, "--config", json.dumps(config), "--out", str(out)]
        env = {**os.environ, **CHILD_ENV, **numerics_env(config.get("numerics"))}
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
            raise RuntimeError(f"{module} --side {side} failed (exit {proc.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    result["load_before"] = load
    result["process_seconds"] = round(time.perf_counter() - started, 1)
    return result


def interleave(
    module: str, sides: Sequence[str], config: dict[str, Any], repeats: int, log: Callable[[str], None] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Run every side once per round, rounds back to back: ours, peer, ours, peer, ..."""
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for r in range(repeats):
        for side in sides:
            result = run_child(module, side, config)
            runs[side].append(result)
            if log:
                log(
                    f"  {module.split('.')[-1]} round {r + 1}/{repeats} {side}: "
                    f"{result.get('summary', '')} (load {result['load_before'][0]}, {result['process_seconds']} s)"
                )
    return runs


def med(runs: list[dict[str, Any]], key: str) -> float:
    """Median of `key` over the runs of one side."""
    return median([float(r[key]) for r in runs])


def row(
    benchmark: str,
    metric: str,
    ours_name: str,
    peer_name: str,
    ours: float,
    peer: float,
    unit: str,
    better: str,
    notes: str = "",
) -> dict[str, Any]:
    """One line of the results table; ratio = ours / peer (`better` says which direction wins)."""
    return {
        "benchmark": benchmark,
        "metric": metric,
        "ours_name": ours_name,
        "peer_name": peer_name,
        "ours": ours,
        "peer": peer,
        "ratio": ratio(ours, peer),
        "unit": unit,
        "better": better,
        "notes": notes,
    }


def load_note(runs: dict[str, list[dict[str, Any]]]) -> str:
    """`load 4.1-5.0` over the runs, flagged when any run started above HIGH_LOAD."""
    loads = [r["load_before"][0] for side in runs.values() for r in side]
    text = f"load {min(loads):.1f}-{max(loads):.1f}"
    return text + " (HIGH: shared CPU)" if max(loads) > HIGH_LOAD else text


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- CLI of a benchmark module
def main(
    module: str,
    run_side: Callable[[str, dict[str, Any]], dict[str, Any]],
    orchestrate: Callable[[dict[str, Any], int], dict[str, Any]],
    default_config: Callable[[bool], dict[str, Any]],
    argv: Sequence[str] | None = None,
) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--side", help="run one side in this process (internal)")
    parser.add_argument("--config", help="JSON configuration of the side (internal)")
    parser.add_argument("--quick", action="store_true", help="micro configuration: checks the code, measures nothing")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (ours, peer) x N; medians reported")
    parser.add_argument("--out", help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.side:
        config = json.loads(args.config) if args.config else default_config(args.quick)
        result = run_side(args.side, config)
        result.setdefault("peak_rss_mb", peak_rss_mb())
    else:
        config = default_config(args.quick)
        config["quick"] = args.quick
        started = time.perf_counter()
        load = load_average()
        result = orchestrate(config, args.repeats)
        result.update(
            load_at_start=load, seconds=round(time.perf_counter() - started, 1), repeats=args.repeats, config=config
        )
    emit(result, args.out)
    return 0


def emit(result: dict[str, Any], out: str | None) -> None:
    """The JSON result to `out`, or to stdout without one."""
    text = json.dumps(result, indent=1, sort_keys=True)
    if out:
        Path(out).write_text(text + "\n")
    else:
        print(text)
