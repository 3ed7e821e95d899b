"""This machine's numeric fingerprint, kept beside every earlier machine's in bench/machines.jsonl.

    python -m bench.fingerprint            # measure, print, compare with the machines before it
    python -m bench.fingerprint --append   # ... and add this machine's line to bench/machines.jsonl

The machines this project is built on change (CPU, measured peak differ severalfold), so each
session can see at once whether its machine computes what the earlier ones did. A line holds the CPU
(model, vendor, the flags that pick kernels), the measured fp32 matmul peak, and
lmpipe.core.numerics.fingerprint() under each numerics mode, each in a fresh process started with
the variables that mode sets. Portable values must be equal on every line (that is the promise);
fast values are equal only between machines that pick the same kernels.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import common

MACHINES = Path(__file__).resolve().parent / "machines.jsonl"
CHILD = """
import json, torch
from lmpipe.core import numerics
from lmpipe.train.flops import measure_peak_flops
torch.set_num_threads({threads})
print(json.dumps({{"hashes": numerics.fingerprint(), "torch_isa": torch.backends.cpu.get_cpu_capability(),
                  "peak_gflops": round(measure_peak_flops(torch.device("cpu"), seconds=2.0) / 1e9, 1)}}))
"""


def measure(mode: str) -> dict[str, Any]:
    """fingerprint() in a fresh process under `mode`'s variables."""
    env = {**os.environ, **common.numerics_env(mode)}
    done = subprocess.run(
        [sys.executable, "-c", CHILD.format(threads=common.THREADS)],
        cwd=common.ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def this_machine() -> dict[str, Any]:
    from lmpipe.core import numerics
    from lmpipe.core.lineage import git_state

    runs = {mode: measure(mode) for mode in numerics.MODES}
    return {
        "date": dt.date.today().isoformat(),
        "git": git_state(common.ROOT).get("rev"),
        "cpu": numerics.cpu_info(),
        "peak_gflops": max(r["peak_gflops"] for r in runs.values()),
        "load": common.load_average()[0],
        **{mode: {"torch_isa": r["torch_isa"], **r["hashes"]} for mode, r in runs.items()},
    }


def compare(line: dict[str, Any], earlier: list[dict[str, Any]]) -> list[str]:
    """One sentence per earlier machine: do its portable (and fast) values equal this one's?"""
    out = []
    for old in earlier:
        same = {mode: old.get(mode) == line[mode] for mode in ("portable", "fast")}
        out.append(
            f"{old['date']} {old['cpu']['model']} ({old['peak_gflops']:.0f} GFLOP/s): portable "
            f"{'SAME' if same['portable'] else 'DIFFERENT'}, fast {'same' if same['fast'] else 'different'}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fingerprint", description=__doc__.splitlines()[0])
    parser.add_argument("--append", action="store_true", help=f"add this machine's line to {MACHINES.name}")
    args = parser.parse_args(argv)
    line = this_machine()
    print(json.dumps(line))
    earlier = [json.loads(x) for x in MACHINES.read_text().splitlines() if x.strip()] if MACHINES.exists() else []
    for sentence in compare(line, earlier):
        print(sentence)
    if args.append:
        with MACHINES.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")
    return 1 if any("portable DIFFERENT" in s for s in compare(line, earlier)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
