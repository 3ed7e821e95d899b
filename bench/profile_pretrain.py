"""Where one pretraining step's time goes: our loop vs the HF Trainer, phase by phase.

Runs the three sides of `bench.mlm_throughput` (same config, same model, same windows; each in
a fresh process) with timers around the phases of a step, attributed to the step in which
they start, and reports the MEDIAN over the timed steps of each phase:

| phase | ours / ours_full | peer (HF Trainer) |
| --- | --- | --- |
| data | `MLMBatches.batch_at` (windows + masking) | `DataCollatorForLanguageModeling.__call__` |
| forward + loss | `lmpipe.mlm.models.objective_loss` | `Trainer.compute_loss` |
| backward | `torch.autograd.backward` | the same |
| clip | `torch.nn.utils.clip_grad_norm_` | the same (through accelerate) |
| optimizer | `Optimizer.step` (global step hooks) | the same |
| other | the rest of the step: scheduler, zero_grad, logging, loop bookkeeping, callbacks |

The timers are wrappers installed in the side's process only (instrumentation, not part of
the project); each costs a few microseconds per call.

    python -m bench.profile_pretrain                  # writes bench/profile_pretrain.md (+ .json)
    python -m bench.profile_pretrain --threads 1      # 1 torch thread: steadier on a busy machine
    python -m bench.profile_pretrain --quick --out-dir /tmp/p   # micro configuration
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import common, mlm_throughput

MODULE = "bench.profile_pretrain"
PHASES = ("data", "forward + loss", "backward", "clip", "optimizer")
SIDES = mlm_throughput.SIDES


class PhaseTimer:
    """Records (phase, start, wall seconds, process CPU seconds) of every timed call."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float, float, float]] = []

    def wrap(self, phase: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.events.append((phase, t0, time.perf_counter() - t0, time.process_time() - c0))

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def optimizer_hooks(self) -> list[Any]:
        from torch.optim import optimizer as optim_module

        start: dict[int, tuple[float, float]] = {}

        def pre(optimizer, args, kwargs) -> None:
            start[id(optimizer)] = (time.perf_counter(), time.process_time())

        def post(optimizer, args, kwargs) -> None:
            t0, c0 = start.pop(id(optimizer))
            self.events.append(("optimizer", t0, time.perf_counter() - t0, time.process_time() - c0))

        return [
            optim_module.register_optimizer_step_pre_hook(pre),
            optim_module.register_optimizer_step_post_hook(post),
        ]


def instrument(side: str, timer: PhaseTimer) -> Callable[[], None]:
    """Install the timers for `side`; returns the function that removes them."""
    import torch
    import transformers

    from lmpipe.mlm import masking, models

    patches: list[tuple[Any, str, Any]] = [
        (torch.autograd, "backward", "backward"),
        (torch.nn.utils, "clip_grad_norm_", "clip"),
    ]
    if side == "peer":
        patches += [
            (transformers.DataCollatorForLanguageModeling, "__call__", "data"),
            (transformers.Trainer, "compute_loss", "forward + loss"),
        ]
    else:
        patches += [(masking.MLMBatches, "batch_at", "data"), (models, "objective_loss", "forward + loss")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, phase in patches:
        setattr(owner, name, timer.wrap(phase, getattr(owner, name)))
    hooks = timer.optimizer_hooks()

    def remove() -> None:
        for owner, name, original in saved:
            setattr(owner, name, original)
        for hook in hooks:
            hook.remove()

    return remove


def per_step(boundaries: list[float], events: list[tuple[str, float, float, float]]) -> list[dict[str, float]]:
    """One dict per timed step: wall (and `cpu <phase>`: process CPU) seconds of each phase started in it,
    `step`, and `other` = step - the phases."""
    steps = []
    for a, b in zip(boundaries, boundaries[1:]):
        row = {phase: 0.0 for phase in PHASES} | {f"cpu {phase}": 0.0 for phase in PHASES}
        for phase, t0, wall, cpu in events:
            if a <= t0 < b:
                row[phase] += wall
                row[f"cpu {phase}"] += cpu
        row["step"] = b - a
        row["other"] = row["step"] - sum(row[p] for p in PHASES)
        steps.append(row)
    return steps


def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    """One mlm_throughput side with the phase timers; medians (ms) of every phase over the timed steps."""
    timer = PhaseTimer()
    remove = instrument(side, timer)
    try:
        result = mlm_throughput.run_side(side, config)
    finally:
        remove()
    steps = per_step(result["boundaries"], timer.events)
    keys = ("step", *PHASES, "other", *(f"cpu {p}" for p in PHASES))
    return {
        "side": side,
        "median_ms": {k: 1000 * statistics.median(s[k] for s in steps) for k in keys},
        "mean_ms": {k: 1000 * statistics.fmean(s[k] for s in steps) for k in keys},
        "tokens_per_s": result["tokens_per_s"],
        "loss_mean": result["loss_mean"],
        "optimizer": result["optimizer"],
        "data": result["data"],
        "peak_rss_mb": result["peak_rss_mb"],
        "summary": f"step {1000 * statistics.median(s['step'] for s in steps):.0f} ms",
    }


def render(config: dict[str, Any], runs: dict[str, list[dict[str, Any]]], load: list[float]) -> str:
    """The markdown table: median ms per phase for each side, medians over rounds."""
    keys = ("step", *PHASES, "other")
    med = {side: {k: common.median([r["median_ms"][k] for r in rs]) for k in keys} for side, rs in runs.items()}
    arch = config["arch"]
    lines = [
        "# Where a pretraining step's time goes: lmpipe loop vs HF Trainer",
        "",
        f"`python -m bench.profile_pretrain{' --threads ' + str(config['threads']) if config['threads'] != 2 else ''}"
        "`"
        f": {arch['family']} {arch['num_layers']}x{arch['hidden_size']} (params.yaml `pretrain.model`), "
        f"batch {config['batch_size']} x {arch['max_length']}, {config['steps']} timed steps after "
        f"{config['warmup_steps']}, fp32, {config['threads']} torch thread(s); "
        f"data: {runs['ours'][0].get('data', '')}; "
        f"load average before: {', '.join(map(str, load))}. Median ms per step over the timed steps "
        f"(median over {len(runs['ours'])} rounds); `other` = step - the timed phases (scheduler, zero_grad, "
        "logging, loop and callback bookkeeping). Measured under the load shown: compare the columns, "
        "not the absolute figures.",
        "",
        "| phase | ours (masked-only head) | ours_full (full head) | peer (HF Trainer) | ours_full - peer |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k in keys:
        o, f, p = med["ours"][k], med["ours_full"][k], med["peer"][k]
        lines.append(f"| {k} | {o:.1f} | {f:.1f} | {p:.1f} | {f - p:+.1f} |")
    cpu = {
        side: {p: common.median([r["median_ms"][f"cpu {p}"] for r in rs]) for p in PHASES} for side, rs in runs.items()
    }
    lines += [
        "",
        "Process CPU ms per phase (all threads of the side's process; steadier than wall time when other "
        "processes share the cores, though spinning OpenMP threads count too):",
        "",
        "| phase (CPU) | ours | ours_full | peer | ours_full - peer |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for p in PHASES:
        o, f, q = cpu["ours"][p], cpu["ours_full"][p], cpu["peer"][p]
        lines.append(f"| {p} | {o:.1f} | {f:.1f} | {q:.1f} | {f - q:+.1f} |")
    tps = {side: common.median([r["tokens_per_s"] for r in rs]) for side, rs in runs.items()}
    lines += [
        "",
        f"tokens/s (median step): ours {tps['ours']:,.0f}, ours_full {tps['ours_full']:,.0f}, peer {tps['peer']:,.0f}; "
        f"optimizers: ours {runs['ours'][0]['optimizer']}, peer {runs['peer'][0]['optimizer']}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="micro configuration: checks the code only")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds (default 2)")
    parser.add_argument("--threads", type=int, default=None, help=f"torch threads (default {common.THREADS})")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: bench.mlm_throughput's)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args(argv)
    if args.side:
        Path(args.out).write_text(json.dumps(run_side(args.side, json.loads(args.config))) + "\n")
        return 0
    config = mlm_throughput.default_config(args.quick)
    config.update({k: v for k, v in (("threads", args.threads), ("steps", args.steps)) if v is not None})
    stem = "profile_pretrain"  # our loop runs the AdamW params.yaml says (pretrain.optim.fused)
    load = common.load_average()
    runs = common.interleave(MODULE, SIDES, config, args.repeats, common.log)
    text = render(config, runs, load)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{stem}.md").write_text(text)
    (args.out_dir / f"{stem}.json").write_text(
        json.dumps({"config": config, "load_before": load, "runs": runs}, indent=1, sort_keys=True) + "\n"
    )
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
