"""Run the benchmarks side by side with their peers; write bench/results.json and results.md.

    python -m bench.run                               # all (what `make bench` runs)
    python -m bench.run tokenize_speed inference      # some
    python -m bench.run --quick                       # micro configurations: checks the code only
    python -m bench.run --repeats 5                   # more interleaved rounds (default 3)
    python -m bench.run --no-spin                     # worker threads sleep, not spin: results-nospin.*

Each benchmark runs in a fresh subprocess (`python -m bench.NAME`), which itself runs every side
in a fresh subprocess, interleaved ours, peer, ours, peer. The table reports medians and the
ratio ours / peer; the `better` column says which direction wins. Results are figures of
THIS machine at THIS load (recorded per benchmark): compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import common

BENCHMARKS = (
    "mlm_throughput",
    "clm_throughput",
    "finetune_throughput",
    "numerics_cost",
    "tokenize_speed",
    "inference",
    "startup",
    "memory",
    "serve_load",  # real HTTP servers: lmpipe serve vs mlflow models serve, then a 3-minute soak
)
OUT_DIR = Path(__file__).resolve().parent


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=common.ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_benchmark(name: str, quick: bool, repeats: int) -> dict[str, Any]:
    """`python -m bench.<name>` in a fresh process; its JSON result (the load before it added)."""
    load = common.load_average()
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as tmp:
        out = Path(tmp) / f"{name}.json"
        cmd = [sys.executable, "-m", f"bench.{name}", "--repeats", str(repeats), "--out", str(out)]
        if quick:
            cmd.append("--quick")
        env = {**os.environ, **common.CHILD_ENV}
        proc = subprocess.run(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=None, text=True)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench.{name} failed (exit {proc.returncode})")
        result = json.loads(out.read_text())
    result["load_before"] = load
    return result


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def render_markdown(results: dict[str, Any]) -> str:
    """The results table (benchmark, ours, peer, ratio, unit, notes) plus machine facts."""
    machine = results["machine"]
    lines = [
        "# Benchmarks: lmpipe side by side with its peers",
        "",
        f"`{results['command']}` at revision `{results['revision']}`, {results['seconds']:.0f} s in all. "
        "Ratio = ours / peer (medians of interleaved runs); `better` says which direction wins. "
        "Figures are this machine's at the load shown: compare ratios, not absolute numbers.",
        "",
        "| benchmark | ours is | peer is | ours | peer | ratio ours/peer | unit | better | notes |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for name, bench in results["benchmarks"].items():
        for r in bench["rows"]:
            lines.append(
                f"| {name}: {r['metric']} | {r['ours_name']} | {r['peer_name']} | {_fmt(r['ours'])} | "
                f"{_fmt(r['peer'])} | **{_fmt(r['ratio'])}** | {r['unit']} | {r['better']} | {r['notes']} |"
            )
    lines += ["", "## Setups", ""]
    for name, bench in results["benchmarks"].items():
        load = bench.get("load_before", [])
        lines.append(
            f"- **{name}** ({bench.get('seconds', 0):.0f} s, {bench.get('repeats')} interleaved rounds, "
            f"load before {', '.join(map(str, load))}): {bench['description']}"
        )
    high = [n for n, b in results["benchmarks"].items() if b.get("load_before", [0])[0] > common.HIGH_LOAD]
    lines += [
        "",
        "## Machine",
        "",
        f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores ({machine['cpus_usable']} usable), "
        f"torch / ORT threads: {machine['torch_threads']}",
        f"- load average (1, 5, 15 min) at start: {', '.join(map(str, machine['load_average_at_start']))}",
        "- thread environment: "
        + (
            ", ".join(f"{k}={v}" for k, v in machine.get("thread_env", {}).items())
            or "defaults (no OMP_* / GOMP_* variable set)"
        ),
        f"- Python {machine['python']}; " + ", ".join(f"{k} {v}" for k, v in machine["versions"].items()),
    ]
    if high:
        lines += [
            "",
            f"**Note:** the 1-minute load exceeded {common.HIGH_LOAD:g} before {', '.join(high)}: other "
            "work shared the cores, so absolute figures are low and noisy. Both sides ran back to back, "
            "interleaved, under the same load; but runtimes whose worker threads spin (torch's OpenMP, "
            "ONNX Runtime) lose far more than others when a core is taken, which distorts ratios "
            + (
                "(this run: no spinning on any side)."
                if machine.get("thread_env", {}).get("LMPIPE_BENCH_NO_SPIN")
                else "(see `python -m bench.run --no-spin`, bench/results-nospin.md)."
            ),
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all of {', '.join(BENCHMARKS)})"
    )
    parser.add_argument("--quick", action="store_true", help="micro configurations (checks the code, measures nothing)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="interleaved rounds per benchmark (default 3: one slow round cannot move the median)",
    )
    parser.add_argument(
        "--no-spin",
        action="store_true",
        help="OMP_WAIT_POLICY=PASSIVE for torch, allow_spinning=0 for ORT: fairer on a shared, "
        "oversubscribed machine; writes results-nospin.json / .md",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help="where results.json / results.md go (default: bench/; --quick: print only)",
    )
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (choose from {', '.join(BENCHMARKS)})")
    names = list(dict.fromkeys(args.names)) or list(BENCHMARKS)
    if args.no_spin:
        os.environ.update(common.NO_SPIN_ENV)  # inherited by every benchmark and side process
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "revision": git_revision(),
        "machine": common.machine_facts(),
        "benchmarks": {},
    }
    results["command"] = results["command"].strip()
    for name in names:
        common.log(f"bench.{name} (load {common.load_average()[0]}) ...")
        results["benchmarks"][name] = run_benchmark(name, args.quick, args.repeats)
    results["seconds"] = round(time.perf_counter() - started, 1)
    text = render_markdown(results)
    out_dir = args.out_dir if args.out_dir is not None else (None if args.quick else OUT_DIR)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = "results-nospin" if args.no_spin else "results"
        (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        (out_dir / f"{stem}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
