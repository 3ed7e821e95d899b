"""Masked-LM encoder against causal-LM decoder at equal pretraining compute, one `dvc exp run` each.

    python -m studies.objectives                       # = make study-objectives (~75 min on 2 cores)
    python -m studies.objectives --reuse               # rebuild the table from the experiments already run
    python -m studies.objectives --only clm-8k,clm-2k

Each arm is a set of `-S` overrides of `params.yaml`, run as a DVC experiment up to `evaluate`
(studies.toolbox.run_experiment: `dvc exp run --temp evaluate -n objectives-<arm> -S ...`), so
any row can be inspected (`dvc exp show`), applied (`dvc exp apply objectives-clm-8k`) and
found in MLflow with all its params. The decoder arms pretrain the llama decoder for
CLM_STEPS steps: the same pretraining FLOPs as the encoder's default 1,400 steps (the table
shows both totals, from each run's own `flops_per_token`).

From each experiment's commit the table reads reports/pretrain/metrics.json (held-out
perplexity and its references, FLOPs per token, steps), reports/perf/pretrain.json (tokens/s,
MFU on this machine) and reports/evaluate/ (each row's test accuracy with its bootstrap 95% CI,
its McNemar test against the TF-IDF baseline, and its predictions). Each decoder row is then
paired with the encoder row of the same labels, mode and early stopping on the same 2,000 test reviews:
accuracy difference with its paired bootstrap 95% interval (evaluate.bootstrap_samples, the
seed of params) and McNemar's p. The prompted rows are paired with the encoder fine-tuned on
8,000 labels. The `-patient` arms turn early stopping off (PATIENT), so both objectives train
their full fine-tuning budget.

Writes reports/study/objectives.{md,json} (committed: the table the README quotes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from studies.toolbox import exp_commit, read_at, run_experiment, show_at

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports/study"
DEFAULT_COMMAND = "make study-objectives"
EXPERIMENT_PREFIX = "objectives-"
BACKBONE = "scratch"  # the backbone pretrained by the pretrain stage (finetune.backbones.scratch)
PROMPTED = ("clm_zero_shot", "clm_few_shot")  # evaluate's prompted rows of a causal LM

# 9.05 MFLOP per token for the 2 x 128 llama (the vocabulary head on every position) against
# 3.89 for the encoder (the head on the 15% masked positions): 1,400 x 3.89 / 9.05 = 602 steps
CLM_STEPS = 600
DECODER = [
    "pretrain.objective=clm",
    "pretrain.model.family=llama",
    f"pretrain.loop.max_steps={CLM_STEPS}",
    f"pretrain.optim.warmup_steps={CLM_STEPS // 10}",  # 10% of the budget, as the encoder's 140 of 1,400
    f"pretrain.loop.eval_every={CLM_STEPS // 4}",  # four evaluations, as the encoder's
    f"pretrain.loop.checkpoint_every={CLM_STEPS // 4}",
]
FEW_LABELS = ["finetune.max_train_examples=2000"]
# 500 steps / an evaluation every 50 = 10 evaluations: patience 10 never stops, every arm trains
# its full budget and keeps its best checkpoint. The shipped patience (3) stopped the decoder at
# step 350, its best at 200, while its random twin went on improving to 500.
PATIENT = ["finetune.early_stopping.patience=10"]
LORA = f"finetune.backbones.{BACKBONE}.mode=lora"


def arms() -> dict[str, dict[str, Any]]:
    """Arm -> its objective, labels, fine-tuning mode, early stopping (`early`: as shipped,
    `none`: patience past the budget) and `-S` overrides (the rest as shipped)."""
    table = {
        "mlm-8k": {"objective": "mlm", "labels": 8000, "mode": "full", "overrides": []},
        "mlm-2k": {"objective": "mlm", "labels": 2000, "mode": "full", "overrides": FEW_LABELS},
        "mlm-8k-lora": {"objective": "mlm", "labels": 8000, "mode": "lora", "overrides": [LORA]},
        "clm-8k": {"objective": "clm", "labels": 8000, "mode": "full", "overrides": DECODER},
        "clm-2k": {"objective": "clm", "labels": 2000, "mode": "full", "overrides": DECODER + FEW_LABELS},
        "clm-8k-lora": {
            "objective": "clm",
            "labels": 8000,
            "mode": "lora",
            # llama's attention names its query and value projections q_proj and v_proj
            "overrides": DECODER + [LORA, f"finetune.backbones.{BACKBONE}.lora_target_modules=[q_proj,v_proj]"],
        },
        "mlm-8k-patient": {"objective": "mlm", "labels": 8000, "mode": "full", "stop": "none", "overrides": PATIENT},
        "clm-8k-patient": {
            "objective": "clm",
            "labels": 8000,
            "mode": "full",
            "stop": "none",
            "overrides": DECODER + PATIENT,
        },
    }
    return {name: {"stop": "early", **arm} for name, arm in table.items()}


def correct_of(predictions_csv: str) -> np.ndarray:
    """Per-example correctness from an evaluate predictions CSV (actual, predicted, ...)."""
    rows = list(csv.DictReader(io.StringIO(predictions_csv)))
    if not rows or not {"actual", "predicted"} <= set(rows[0]):
        raise SystemExit("objectives: a predictions CSV without actual/predicted columns")
    return np.array([r["actual"] == r["predicted"] for r in rows])


def paired(correct: np.ndarray, reference: np.ndarray, n_samples: int, seed: int) -> dict[str, float]:
    """`correct` against `reference` on the same examples: difference [95% CI] and McNemar's p."""
    from lmpipe.task import metrics

    diff, low, high = metrics.accuracy_difference_ci(correct, reference, n_samples, seed=seed)
    test = metrics.mcnemar(correct, reference)
    return {
        "diff": diff,
        "diff_low": low,
        "diff_high": high,
        "p": test["p_value"],
        "wins": test["b"],
        "losses": test["c"],
    }


def read_arm(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    """What the table needs from experiment `objectives-<name>`'s commit."""
    import yaml

    commit = exp_commit(EXPERIMENT_PREFIX + name)
    if commit is None:
        raise SystemExit(f"objectives: experiment {EXPERIMENT_PREFIX + name} not found (run it without --reuse)")
    params = yaml.safe_load(show_at(commit, "params.yaml"))
    pre = read_at(commit, "reports/pretrain/metrics.json")
    perf = read_at(commit, "reports/perf/pretrain.json")
    test = read_at(commit, "reports/evaluate/metrics.json")
    loop, model = params["pretrain"]["loop"], params["pretrain"]["model"]
    tokens = pre["steps"] * loop["batch_size"] * loop["grad_accum"] * model["max_length"]
    rows = {
        row: {
            **{k: test[row][k] for k in ("accuracy", "accuracy_ci_low", "accuracy_ci_high", "f1", "mcnemar_p")},
            "correct": correct_of(show_at(commit, f"reports/evaluate/predictions/{row}.csv")),
        }
        for row in (BACKBONE, "random", *PROMPTED)
        if row in test
    }
    return {
        **spec,
        "arm": name,
        "commit": commit,
        "steps": pre["steps"],
        "tokens": tokens,
        "tflop": tokens * pre["flops_per_token"] / 1e12,
        "ppl": pre["val_perplexity"],
        "vs_unigram": pre["perplexity_vs_unigram"],
        "vs_bigram": pre.get("perplexity_vs_bigram"),
        "tokens_per_s": perf["tokens_per_s"],
        "mfu": perf["mfu"],
        "rows": rows,
        "bootstrap": (params["evaluate"]["bootstrap_samples"], params["base"]["seed"]),
    }


def _rows_of(arm: dict[str, Any]) -> list[tuple[str, str]]:
    """(row, how it was trained) of `arm` in table order. The random twin and the prompts do not
    depend on the backbone's mode, and the prompts not on the labels: one copy of each."""
    out = [(BACKBONE, arm["mode"] if arm["stop"] == "early" else f"{arm['mode']}, no early stop")]
    if arm["mode"] == "full":
        out.append(("random", "full, random init" if arm["stop"] == "early" else "random init, no early stop"))
        if arm["labels"] == 8000 and arm["stop"] == "early":
            out += [(row, "prompted") for row in PROMPTED]
    return [(row, how) for row, how in out if row in arm["rows"]]


def _setting(arm: dict[str, Any]) -> tuple[int, str, str]:
    return arm["labels"], arm["mode"], arm["stop"]


def compare(found: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per classifier: every arm's fine-tuned backbone and (full mode) its random twin,
    and the decoder's prompted rows; each decoder row paired with the encoder's row of the same
    labels, mode and early stopping."""
    out = []
    for arm in found.values():
        n_samples, seed = arm["bootstrap"]
        for row, how in _rows_of(arm):
            got = arm["rows"][row]
            entry = {
                "arm": arm["arm"],
                "objective": arm["objective"],
                "row": row,
                "how": how,
                "labels": 0 if row in PROMPTED else arm["labels"],
                **{k: v for k, v in got.items() if k != "correct"},
            }
            if arm["objective"] == "clm":
                # the encoder arm of the same labels, mode and stopping; the prompts face the encoder on 8,000 labels
                key = (8000, "full", "early") if row in PROMPTED else _setting(arm)
                encoder = next((e for e in found.values() if e["objective"] == "mlm" and _setting(e) == key), None)
                if encoder is not None:
                    reference = encoder["rows"]["random" if row == "random" else BACKBONE]["correct"]
                    entry["vs_encoder"] = paired(got["correct"], reference, n_samples, seed)
            out.append(entry)
    return out


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(found: dict[str, dict[str, Any]], rows: list[dict[str, Any]], command: str) -> str:
    lines = [
        "# Masked-LM encoder against causal-LM decoder at equal pretraining compute\n",
        f"`{command}`: one `dvc exp run --temp evaluate -S ...` per arm (`objectives-<arm>`). "
        "Perplexities are each objective's own on held-out text (masked tokens for the encoder, next "
        "tokens for the decoder), so compare each with its references, not with each other. Tokens/s "
        "and MFU are this machine's, under whatever else ran.\n",
        "| objective | steps | tokens | pretraining TFLOP | held-out perplexity | vs unigram | vs bigram "
        "| tokens/s | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for arm in found.values():
        if arm["objective"] in seen:
            continue
        seen.add(arm["objective"])
        lines.append(
            f"| {arm['objective']} | {arm['steps']:,} | {arm['tokens']:,} | {arm['tflop']:.1f} | {arm['ppl']:.1f} | "
            f"{_ratio(arm['vs_unigram'])} | {_ratio(arm['vs_bigram'])} | {arm['tokens_per_s']:,.0f} | "
            f"{arm['mfu']:.2f} |"
        )
    lines += [
        "",
        "Test accuracy on the 2,000 test reviews with its bootstrap 95% CI; McNemar's p against the TF-IDF "
        "baseline; each decoder row against the encoder row of the same labels, mode and early stopping (its "
        "random twin against the encoder's; the prompted rows against the encoder fine-tuned on 8,000 labels): "
        "accuracy difference [paired 95% CI], McNemar p.\n",
        "| arm | model | labels | test accuracy [95% CI] | macro-F1 | p vs baseline | decoder - encoder [95% CI] | p |",
        "|---|---|---:|---|---:|---:|---|---:|",
    ]
    for r in rows:
        vs = r.get("vs_encoder")
        paired_cells = (
            f"{vs['diff']:+.4f} [{vs['diff_low']:+.4f}, {vs['diff_high']:+.4f}] | {vs['p']:.3g}" if vs else "- | -"
        )
        labels = "prompt" if r["labels"] == 0 else f"{r['labels']:,}"
        lines.append(
            f"| {r['arm']} | {r['row']} ({r['how']}) | {labels} | {r['accuracy']:.4f} "
            f"[{r['accuracy_ci_low']:.4f}, {r['accuracy_ci_high']:.4f}] | {r['f1']:.4f} | {r['mcnemar_p']:.3g} | "
            f"{paired_cells} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=None, help="comma-separated arms (default: all)")
    parser.add_argument("--reuse", action="store_true", help="run no experiment: read the ones already run")
    args = parser.parse_args(argv)
    table = arms()
    chosen = args.only.split(",") if args.only else list(table)
    unknown = [a for a in chosen if a not in table]
    if unknown:
        parser.error(f"--only: unknown {unknown} (known: {list(table)})")
    if not args.reuse:
        for name in chosen:
            print(f"objectives: {name} {' '.join(table[name]['overrides'])}", flush=True)
            ok, error = run_experiment(EXPERIMENT_PREFIX + name, table[name]["overrides"])
            if not ok:
                raise SystemExit(f"objectives: {name} failed: {error}")
    found = {name: read_arm(name, table[name]) for name in chosen}
    rows = compare(found)
    given = argv if argv is not None else sys.argv[1:]
    command = DEFAULT_COMMAND if not given else "python -m studies.objectives " + " ".join(given)
    if args.reuse:
        command += " (the table, from experiments already run by this study)"
    from lmpipe.core.io import write_text

    summary = {
        "arms": {n: {k: v for k, v in a.items() if k not in ("rows", "bootstrap")} for n, a in found.items()},
        "rows": rows,
    }
    write_text(OUT / "objectives.json", json.dumps(summary, indent=2, default=float) + "\n")
    write_text(OUT / "objectives.md", markdown(found, rows, command))
    print((OUT / "objectives.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
