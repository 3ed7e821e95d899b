"""When does pretraining pay? Pretrain for increasing budgets, fine-tune at several label counts.

    python -m studies.pretraining_payoff                       # = make study
    python -m studies.pretraining_payoff --budgets 0.5,1,2 --labels 200,2000 --seeds 42

For each pretraining budget (a multiple of the default `pretrain.loop.max_steps`, warmup and
evaluation scaled with it) the encoder of `params.yaml` is pretrained with the stage's own code
(lmpipe.pretrain.pretraining.run_pretrain) on the pipeline's `data/tokens`. At each label count, the
pretrained encoder and the same architecture at random init are fine-tuned with the
`finetune.backbones.scratch` recipe (lmpipe.finetune.finetuning.run_finetune: same lr, early stopping
on validation accuracy; max(--min-steps, one epoch of the labels) steps) on a
stratified subsample of the train split, and both are scored on the test split: accuracy, the
paired difference with its bootstrap 95% interval, McNemar's p. The random-init arm does not
depend on the budget, so it is trained once per label count and seed.

Writes reports/study/<name>.{csv,md,png} (default name pretraining_payoff; committed: the
table the README quotes).
It needs the outputs of `dvc repro tokenize` (data/processed, data/tokens, models/tokenizer).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROCESSED, TOKENS, TOKENIZER = ROOT / "data/processed", ROOT / "data/tokens", ROOT / "models/tokenizer"
OUT = ROOT / "reports/study"
DEFAULT_COMMAND = "make study"  # how the default table is regenerated
log = logging.getLogger("studies.pretraining_payoff")


def budget_params(params: Any, budget: float, seed: int) -> Any:
    """params with the pretraining budget scaled by `budget` (one evaluation at the end)."""
    loop, optim = params.pretrain.loop, params.pretrain.optim
    steps = max(1, round(loop.max_steps * budget))
    pretrain = params.pretrain.model_copy(
        update={
            "loop": loop.model_copy(update={"max_steps": steps, "eval_every": steps, "checkpoint_every": steps}),
            "optim": optim.model_copy(update={"warmup_steps": round(optim.warmup_steps * budget)}),
        }
    )
    return params.model_copy(update={"pretrain": pretrain, "base": params.base.model_copy(update={"seed": seed})})


def finetune_params(params: Any, source: Path, init: str, labels: int | None, seed: int, min_steps: int = 300) -> Any:
    """params whose only backbone `arm` runs the scratch recipe (lr, early stopping, ...) on
    `source` with `labels` examples, for max(min_steps, one epoch) steps."""
    ft = params.finetune
    recipe = ft.backbones["scratch"]
    epoch = math.ceil((labels or train_rows()) / ft.batch_size)
    run = recipe.model_copy(update={"source": str(source), "init": init, "max_steps": max(min_steps, epoch)})
    finetune = ft.model_copy(update={"backbones": {"arm": run}, "max_train_examples": labels})
    return params.model_copy(update={"finetune": finetune, "base": params.base.model_copy(update={"seed": seed})})


def train_rows() -> int:
    """Rows of the train split (Parquet metadata only): the label count `all` stands for."""
    import pyarrow.parquet as pq

    return pq.ParquetFile(PROCESSED / "train.parquet").metadata.num_rows


EVAL_BATCH = 64  # test texts per forward pass, as fine-tuning's validation


def correct_on_test(model: Any, tokenizer: Any, params: Any) -> np.ndarray:
    """Per-example correctness of a fine-tuned model on the test split (encoded as in training)."""
    from lmpipe.inference.batched import torch_logits
    from lmpipe.inference.encoding import encode_texts
    from lmpipe.task.splits import load_split

    texts, labels = load_split(PROCESSED, "test")
    ids = encode_texts(tokenizer, texts, params.finetune.max_length, params.finetune.truncation)["input_ids"]
    return torch_logits(model, ids, tokenizer.pad_token_id, EVAL_BATCH).argmax(axis=1) == labels


def finetune_arm(
    params: Any, source: Path, init: str, labels: int | None, seed: int, device: Any, min_steps: int
) -> dict[str, Any]:
    from lmpipe.finetune import finetuning

    p = finetune_params(params, source, init, labels, seed, min_steps)
    started = time.perf_counter()
    done = finetuning.run_finetune(
        p, "arm", processed_dir=PROCESSED, checkpoint_dir=None, curves_dir=None, device=device
    )
    correct = correct_on_test(done.model, done.tokenizer, p)
    return {
        "correct": correct,
        "accuracy": float(correct.mean()),
        "val_accuracy": done.metrics["val_accuracy"],
        "steps": done.metrics["steps"],
        "seconds": time.perf_counter() - started,
    }


def run_study(
    budgets: list[float],
    label_counts: list[int | None],
    seeds: list[int],
    name: str = "pretraining_payoff",
    min_steps: int = 300,
    command: str = DEFAULT_COMMAND,
) -> list[dict[str, Any]]:
    from lmpipe.core.params import load_params
    from lmpipe.core.stage import setup_torch
    from lmpipe.mlm import models
    from lmpipe.pretrain import pretraining
    from lmpipe.task import metrics as M

    params = load_params(ROOT / "params.yaml")
    rows, random_arms = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for budget in budgets:
                device = setup_torch(seed, params.base.threads, params.base.device)
                bp = budget_params(params, budget, seed)
                started = time.perf_counter()
                done = pretraining.run_pretrain(bp, tokens_dir=TOKENS, tokenizer_dir=TOKENIZER, device=device)
                minutes = (time.perf_counter() - started) / 60
                source = Path(tmp) / f"encoder-{seed}-{budget}"
                models.save_mlm(done.model.to("cpu"), TOKENIZER, source)
                log.info(
                    "budget %gx: %d steps, %.1f min, perplexity %.1f (%.3fx unigram)",
                    budget,
                    done.metrics["steps"],
                    minutes,
                    done.metrics["val_perplexity"],
                    done.metrics["perplexity_vs_unigram"],
                )
                for labels in label_counts:
                    if (seed, labels) not in random_arms:  # the control does not depend on the budget
                        random_arms[(seed, labels)] = finetune_arm(
                            params, source, "random", labels, seed, device, min_steps
                        )
                    control = random_arms[(seed, labels)]
                    treated = finetune_arm(params, source, "pretrained", labels, seed, device, min_steps)
                    diff, low, high = M.accuracy_difference_ci(treated["correct"], control["correct"], 1000, 0.95, seed)
                    test = M.mcnemar(treated["correct"], control["correct"])
                    row = {
                        "seed": seed,
                        "budget": budget,
                        "pretrain_steps": done.metrics["steps"],
                        "pretrain_tokens": int(
                            done.metrics["steps"] * bp.pretrain.loop.batch_size * bp.pretrain.model.max_length
                        ),
                        "pretrain_minutes": round(minutes, 2),
                        "perplexity_vs_unigram": round(done.metrics["perplexity_vs_unigram"], 4),
                        "labels": labels or "all",
                        "finetune_steps": treated["steps"],
                        "pretrained_accuracy": treated["accuracy"],
                        "random_accuracy": control["accuracy"],
                        "difference": diff,
                        "ci_low": low,
                        "ci_high": high,
                        "mcnemar_p": test["p_value"],
                    }
                    log.info(
                        "budget %gx, %s labels: pretrained %.4f, random %.4f, difference %+.4f [%+.4f, %+.4f]",
                        budget,
                        row["labels"],
                        row["pretrained_accuracy"],
                        row["random_accuracy"],
                        diff,
                        low,
                        high,
                    )
                    rows.append(row)
                    write_outputs(rows, name, command)  # a partial table survives an interrupted study
    return rows


def verdict(rows: list[dict[str, Any]]) -> str:
    """Where pretraining wins or loses significantly (95% interval of the difference clear of 0),
    per label count, in budget order; one seed per cell is noisy, so the pattern is the answer."""
    lines = []
    for labels in dict.fromkeys(r["labels"] for r in rows):
        cells = sorted((r for r in rows if r["labels"] == labels), key=lambda r: (r["budget"], r["seed"]))
        wins = [f"{r['budget']:g}x" for r in cells if r["ci_low"] > 0]
        losses = [f"{r['budget']:g}x" for r in cells if r["ci_high"] < 0]
        ties = len(cells) - len(wins) - len(losses)
        lines.append(
            f"- {labels} labels: pretrained wins at {', '.join(wins) or 'no budget'}; "
            f"loses at {', '.join(losses) or 'no budget'}; no significant difference in {ties} of {len(cells)}."
        )
    if not any(r["ci_low"] > 0 for r in rows):
        lines.append("Pretraining did not win at any budget and label count tried.")
    return "\n".join(lines)


def write_outputs(rows: list[dict[str, Any]], name: str = "pretraining_payoff", command: str = DEFAULT_COMMAND) -> None:
    """reports/study/<name>.csv, .md (table + verdict) and .png, atomically."""
    import pandas as pd

    from lmpipe.core.io import atomic_file, write_text
    from lmpipe.evaluate import plots

    frame = pd.DataFrame(rows)
    with atomic_file(OUT / f"{name}.csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.4f")
    lines = [
        "# When does pretraining pay?",
        "",
        "Test accuracy (2,000 reviews) of the pretrained encoder and the same architecture at random init, "
        f"both fine-tuned with the `finetune.backbones.scratch` recipe. Regenerate: `{command}`.",
        "",
        "| seed | budget | pretrain steps | tokens | minutes | ppl / unigram | labels | pretrained | random "
        "| difference [95% CI] | McNemar p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['budget']}x | {r['pretrain_steps']} | {r['pretrain_tokens']:,} | "
            f"{r['pretrain_minutes']:.1f} | {r['perplexity_vs_unigram']:.3f} | {r['labels']} | "
            f"{r['pretrained_accuracy']:.4f} | {r['random_accuracy']:.4f} | {r['difference']:+.4f} "
            f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] | {r['mcnemar_p']:.3g} |"
        )
    write_text(OUT / f"{name}.md", "\n".join(lines + ["", verdict(rows)]) + "\n")
    plots.save(plots.payoff_figure(frame), OUT / f"{name}.png")


def _labels(text: str) -> list[int | None]:
    return [None if x == "all" else int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="0.25,0.5,1,2", help="multiples of pretrain.loop.max_steps")
    parser.add_argument("--labels", default="200,2000,8000", help="label counts ('all' = the whole train split)")
    parser.add_argument("--seeds", default="42", help="comma-separated seeds")
    parser.add_argument("--name", default="pretraining_payoff", help="output file stem under reports/study/")
    parser.add_argument(
        "--min-steps", type=int, default=300, help="fine-tuning steps per arm: max(this, one epoch of the labels)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("lmpipe.train.training", "lmpipe.finetune.finetuning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    rows = run_study(
        [float(x) for x in args.budgets.split(",")],
        _labels(args.labels),
        [int(x) for x in args.seeds.split(",")],
        args.name,
        args.min_steps,
        " ".join(["python -m studies.pretraining_payoff", *(argv if argv is not None else sys.argv[1:])]),
    )
    print(verdict(rows))


if __name__ == "__main__":
    main()
