"""What portable numerics cost: the training loops under `base.numerics: portable` against `fast`.

Sides (each in its own fresh process, interleaved): `pretrain_portable`, `pretrain_fast`,
`finetune_portable`, `finetune_fast`. A `pretrain_*` side is bench.mlm_throughput's `ours` (the
pipeline's masked-LM loop on params.yaml `pretrain`), a `finetune_*` side bench.finetune_throughput's
`ours` (the fine-tuning loop on the `scratch` backbone); the only difference between a pair is the
environment lmpipe.core.numerics sets before the child loads numpy and torch: portable pins the
AVX2 kernels, fast lets the CPU pick (AVX-512 where present). On an AVX2-only machine both are the
same kernels and the ratio is ~1. Ratio = portable / fast tokens/s (higher is better; 1 = free).
"""

from __future__ import annotations

import sys
from typing import Any

from bench import common

MODULE = "bench.numerics_cost"
SIDES = ("pretrain_portable", "pretrain_fast", "finetune_portable", "finetune_fast")


def default_config(quick: bool = False) -> dict[str, Any]:
    from bench import finetune_throughput, mlm_throughput

    return {"pretrain": mlm_throughput.default_config(quick), "finetune": finetune_throughput.default_config(quick)}


def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    import torch

    from bench import finetune_throughput, mlm_throughput

    loop, mode = side.split("_")
    bench = mlm_throughput if loop == "pretrain" else finetune_throughput
    result = bench.run_side("ours", config[loop])
    result.update(side=side, numerics=torch.backends.cpu.get_cpu_capability(), mode=mode)  # the kernels it ran
    return result


def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for r in range(repeats):
        for side in SIDES:
            result = common.run_child(MODULE, side, {**config, "numerics": side.split("_")[1]})
            runs[side].append(result)
            common.log(
                f"  numerics_cost round {r + 1}/{repeats} {side}: {result['tokens_per_s']:.0f} tokens/s, "
                f"torch kernels {result['numerics']} (load {result['load_before'][0]})"
            )
    m = {side: common.med(r, "tokens_per_s") for side, r in runs.items()}
    isa = {side: r[0]["numerics"] for side, r in runs.items()}
    rows = [
        common.row(
            "numerics_cost",
            f"{loop} tokens/s",
            f"portable ({isa[f'{loop}_portable']} kernels)",
            f"fast ({isa[f'{loop}_fast']} kernels)",
            round(m[f"{loop}_portable"], 1),
            round(m[f"{loop}_fast"], 1),
            "tokens/s",
            "higher",
            f"the pipeline's {loop} loop (bench.{'mlm' if loop == 'pretrain' else 'finetune'}_throughput `ours`); "
            + common.load_note({k: v for k, v in runs.items() if k.startswith(loop)}),
        )
        for loop in ("pretrain", "finetune")
    ]
    what = "the pipeline's training loops, base.numerics portable against fast, same params, same data"
    return {"benchmark": "numerics_cost", "description": what, "rows": rows, "medians": m, "runs": runs}


if __name__ == "__main__":
    sys.exit(common.main(MODULE, run_side, orchestrate, default_config))
