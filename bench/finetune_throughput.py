"""Fine-tuning throughput: our loop vs the HF Trainer, side by side, on the same model and batches.

Sides (each in its own fresh process, interleaved ours, peer, ours_random, peer_grouped, ...):

- `ours`: what `stages/finetune.py` runs: `lmpipe.finetune.finetuning.make_batch_at` (length
  bucketing, on by default: batches of similar length, each padded to its longest) +
  `classification_loss` + the one loop `lmpipe.train.training.train`.
- `ours_random`: the same loop with bucketing off (random batches): isolates the loop.
- `peer`: `transformers.Trainer` with its defaults (random sampler, `adamw_torch_fused`) and
  `DataCollatorWithPadding` (each batch padded to its longest): what the HF recipe gives.
- `peer_grouped`: the Trainer with `train_sampling_strategy="group_by_length"` (its
  `LengthGroupedSampler`: megabatches of 50 batches sorted by length, like our 50-batch chunks).

Same for all: the classifier of `params.yaml` `finetune.backbones.<backbone>` built by
`lmpipe.finetune.finetuning.build_classifier` with the same seed (same weights; `scratch` =
models/pretrained, else a stand-in of the `pretrain.model` shape saved by `lmpipe.mlm.models`),
the same examples (a stratified subsample of data/processed train, exactly one epoch:
batch_size x steps examples) encoded ONCE, before the clock, by `lmpipe.inference.encoding.
encode_texts` (finetune.max_length and truncation: both sides train on the same ids), batch size,
lr, AdamW betas / weight decay, clipping, linear warm-up then cosine to 10%, fp32, log every 10
steps on both sides, no evaluation nor checkpoint inside the timed window.

Throughput counts REAL tokens (attention_mask = 1): a side that pads less does not get credit
for computing pads, and both sides see the same real tokens per epoch. `positions_per_s` counts
computed positions (pads included). Wall time from the end of the untimed steps to the end of
the last step. Equal loss: after training, every side's model is scored by the same evaluator
(`lmpipe.finetune.finetuning.make_evaluator`) on the same validation examples.

    python -m bench.finetune_throughput                     # scratch (the default backbone)
    python -m bench.finetune_throughput --backbone minilm   # the MiniLM-L6 shape (models/minilm)
    python -m bench.finetune_throughput --fused             # our loop with TrainConfig(fused=True)
    OMP_WAIT_POLICY=PASSIVE python -m bench.finetune_throughput --threads 1   # steadier on a busy machine
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common

MODULE = "bench.finetune_throughput"
SIDES = ("ours", "peer", "ours_random", "peer_grouped")
PROCESSED = Path("data/processed")
STANDIN_VOCAB = 2000  # placeholder words w0..w1999 when data/processed or the backbone folder is missing
BACKBONE = "scratch"  # `--backbone NAME` (a key of finetune.backbones) sets it before the config is built
THREADS = common.THREADS  # `--threads N`: e.g. 1 thread (with OMP_WAIT_POLICY=PASSIVE) on a busy machine
FUSED = False  # `--fused`: our loop with TrainConfig(fused=True) (the peer's optimizer is fused by default)


def default_config(quick: bool = False) -> dict[str, Any]:
    from lmpipe.core.params import load_params

    params = load_params(common.ROOT / "params.yaml")
    ft = params.finetune
    if BACKBONE not in ft.backbones:
        raise SystemExit(f"--backbone must be one of {sorted(ft.backbones)} (got {BACKBONE!r})")
    run = ft.backbones[BACKBONE]
    config = {
        "backbone": BACKBONE,
        "source": run.source,
        "init": run.init,
        "standin_arch": params.pretrain.model.model_dump(),  # used only when the source folder is missing
        "processed_dir": str(PROCESSED),
        "max_length": ft.max_length,
        "truncation": ft.truncation,
        "batch_size": ft.batch_size,
        "untimed_steps": 10,  # allocation, page faults, first kernels: not timed
        "steps": 60,  # timed steps (~0.1-0.3 s each for scratch on 2 cores)
        "log_every": 10,  # the stage's cadence (finetuning.LOG_EVERY); the peer's logging_steps
        "lr": run.lr,
        "weight_decay": ft.weight_decay,
        "betas": [0.9, 0.999],  # TrainConfig's default, which the stage uses; the Trainer's default too
        "clip_norm": ft.clip_norm,
        "warmup_ratio": ft.warmup_ratio,
        "min_lr_ratio": 0.1,  # TrainConfig's default, which the stage uses
        "eval_examples": 256,
        "fused": FUSED or ft.fused_optimizer,  # the AdamW the pipeline runs (params); --fused forces the fused kernel
        "seed": params.base.seed,
        "threads": THREADS,
    }
    if quick:
        config.update(
            source="",  # always the stand-in
            init="pretrained",
            standin_arch={**config["standin_arch"], "num_layers": 1, "hidden_size": 32, "num_heads": 2}
            | {"intermediate_size": 64, "max_length": 32},
            processed_dir="",
            max_length=32,
            batch_size=4,
            untimed_steps=1,
            steps=4,
            log_every=2,
            eval_examples=8,
            threads=1,
        )
    return config


# --------------------------------------------------------------------------- data and model shared by all sides
def _standin_texts(config: dict[str, Any], n: int, stream: int) -> tuple[list[str], np.ndarray]:
    """`n` texts of placeholder words (lengths spread from 3 to 2 x max_length words), random labels."""
    rng = np.random.default_rng([config["seed"], stream])
    lengths = rng.integers(3, 2 * config["max_length"], size=n)
    texts = [" ".join(f"w{i}" for i in rng.integers(0, STANDIN_VOCAB, size=k)) for k in lengths]
    return texts, rng.integers(0, 2, size=n).astype(np.int64)


def load_examples(config: dict[str, Any]) -> tuple[list[str], tuple, tuple, str]:
    """(label names, (train texts, labels), (val texts, labels), source): one epoch of training examples."""
    from lmpipe.task.splits import load_label_names, load_split, stratified_subsample

    n_train = config["batch_size"] * (config["untimed_steps"] + config["steps"])
    processed = Path(config["processed_dir"]) if config.get("processed_dir") else None
    if processed is None or not (processed / "train.parquet").is_file():
        return (
            ["negative", "positive"],
            _standin_texts(config, n_train, 0),
            _standin_texts(config, config["eval_examples"], 1),
            "generated placeholder text",
        )
    names = load_label_names(processed)
    texts, labels = load_split(processed, "train", len(names))
    keep = stratified_subsample(labels, n_train, config["seed"])
    val_texts, val_labels = load_split(processed, "val", len(names))
    val = (val_texts[: config["eval_examples"]], val_labels[: config["eval_examples"]])
    return names, ([texts[i] for i in keep], labels[keep]), val, f"{processed} ({len(keep)} train examples)"


def _write_standin(config: dict[str, Any], folder: Path) -> str:
    """A masked-LM folder of the pretrain.model shape (seeded weights) with a placeholder-word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from lmpipe.core.params import Architecture
    from lmpipe.mlm.models import build_mlm, mlm_config, save_mlm
    from lmpipe.tokenize.tokenization import SPECIAL_TOKENS, to_transformers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS.values())}
    vocab.update({f"w{i}": len(SPECIAL_TOKENS) + i for i in range(STANDIN_VOCAB)})
    tok = Tokenizer(models.WordPiece(vocab, unk_token=SPECIAL_TOKENS["unk"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = folder / "tokenizer"
    to_transformers(tok, "wordpiece", True).save_pretrained(str(tok_dir))
    special = {name: vocab[token] for name, token in SPECIAL_TOKENS.items()}
    arch = Architecture(**config["standin_arch"])
    mlm = build_mlm(mlm_config(arch, len(vocab), special), config["seed"])
    save_mlm(mlm, tok_dir, folder / "model")
    why = f"{config['source']} missing" if config.get("source") else "quick mode"
    return f"stand-in: random-init {arch.family} {arch.num_layers}x{arch.hidden_size} ({why})"


def prepare(config: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Examples encoded by the one encoding, the classifier (same seed: same weights), its tokenizer."""
    from lmpipe.finetune.finetuning import build_classifier
    from lmpipe.inference.classifier import load_tokenizer
    from lmpipe.inference.encoding import encode_texts

    source = Path(config["source"]) if config.get("source") else None
    if source is not None and (source / "config.json").is_file():
        model_dir, model_note = source, f"{source} ({config['init']} init)"
    else:
        model_note, model_dir = _write_standin(config, tmp), tmp / "model"
    names, (texts, labels), (val_texts, val_labels), data_note = load_examples(config)
    tokenizer = load_tokenizer(model_dir)
    model = build_classifier(model_dir, names, mode="full", seed=config["seed"], init=config.get("init", "pretrained"))
    encode = lambda t: encode_texts(tokenizer, t, config["max_length"], config["truncation"])  # noqa: E731
    return {
        "model": model,
        "tokenizer": tokenizer,
        "train": encode(texts)["input_ids"],
        "labels": labels,
        "val": encode(val_texts)["input_ids"],
        "val_labels": val_labels,
        "notes": {"model": model_note, "data": data_note, "params": int(sum(p.numel() for p in model.parameters()))},
    }


# --------------------------------------------------------------------------- the sides
def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    from lmpipe.core.stage import setup_torch
    from lmpipe.finetune.finetuning import make_evaluator

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} (got {side!r})")
    setup_torch(config["seed"], config["threads"], "cpu")
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-ft-") as tmp:
        data = prepare(config, Path(tmp))
        run = _run_peer if side.startswith("peer") else _run_ours
        result = run(side, config, data)
        evaluate = make_evaluator({"input_ids": data["val"]}, data["val_labels"], data["tokenizer"].pad_token_id)
        with torch.no_grad():
            result.update(evaluate(data["model"]))  # the same evaluator and examples for every side
    result.update(side=side, torch_threads=torch.get_num_threads(), peak_rss_mb=common.peak_rss_mb(), **data["notes"])
    result["summary"] = (
        f"{result['tokens_per_s']:.0f} real tokens/s, pad {result['pad_share']:.1%}, train loss "
        f"{result['loss_mean']:.3f}, val loss {result['val_loss']:.3f}, {result['peak_rss_mb']:.0f} MiB"
    )
    return result


def _measured(config: dict[str, Any], boundaries: list[float], shapes: list[tuple[int, int]], losses: list[float]):
    """Throughput of the timed steps from their N + 1 time stamps and (real, padded) token counts."""
    steps, untimed = config["steps"], config["untimed_steps"]
    if len(boundaries) != steps + 1 or len(shapes) != untimed + steps:
        raise RuntimeError(
            f"expected {steps + 1} boundaries and {untimed + steps} batches, got {len(boundaries)} and {len(shapes)}"
        )
    seconds = boundaries[-1][0] - boundaries[0][0]
    cpu_seconds = boundaries[-1][1] - boundaries[0][1]
    real = sum(r for r, _ in shapes[untimed:])
    padded = sum(p for _, p in shapes[untimed:])
    all_real, all_padded = sum(r for r, _ in shapes), sum(p for _, p in shapes)
    return {
        "tokens_per_s": real / seconds,
        "positions_per_s": padded / seconds,
        "tokens_per_cpu_s": real / cpu_seconds,  # this process's CPU time: steadier than wall time under load
        "real_tokens_timed": real,
        "real_tokens_epoch": all_real,
        "pad_share": 1.0 - all_real / all_padded,
        "seconds": seconds,
        "step_seconds": [round(b[0] - a[0], 4) for a, b in zip(boundaries, boundaries[1:])],
        "steps_measured": steps,
        "loss_first": losses[0],
        "loss_mean": sum(losses) / len(losses),
        "loss_last": losses[-1],
    }


def _run_ours(side: str, config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    from lmpipe.finetune.finetuning import classification_loss, make_batch_at
    from lmpipe.train import training

    total, untimed = config["untimed_steps"] + config["steps"], config["untimed_steps"]
    batch_at = make_batch_at(
        {"input_ids": data["train"]},
        data["labels"],
        batch_size=config["batch_size"],
        grad_accum=1,
        seed=config["seed"],
        pad_id=data["tokenizer"].pad_token_id,
        bucket=side == "ours",
    )
    boundaries: list[tuple[float, float]] = []
    shapes: list[tuple[int, int]] = []

    def timed_batch_at(step: int, micro: int, rank: int, world: int):
        if step >= untimed:
            boundaries.append((time.perf_counter(), time.process_time()))  # a timed step starts
        batch = batch_at(step, micro, rank, world)
        shapes.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    def evaluate(model) -> dict[str, float]:
        boundaries.append((time.perf_counter(), time.process_time()))  # called once, after the last step
        return {}

    cfg = training.TrainConfig(
        max_steps=total,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        betas=tuple(config["betas"]),
        warmup_steps=round(config["warmup_ratio"] * total),
        min_lr_ratio=config["min_lr_ratio"],
        clip_norm=config["clip_norm"],
        eval_every=total,
        checkpoint_every=total,
        log_every=config["log_every"],
        precision="fp32",
        fused=config.get("fused", False),
    )
    result = training.train(
        data["model"],
        loss_fn=classification_loss,
        batch_at=timed_batch_at,
        evaluate=evaluate,
        config=cfg,
        device=torch.device("cpu"),
    )
    losses = [row["loss"] for row in result.history["train"]]
    sampling = "length buckets (chunks of 50 batches)" if side == "ours" else "random batches"
    optimizer = "AdamW fused" if config.get("fused") else "AdamW (torch default: for-loop on CPU)"
    return {**_measured(config, boundaries, shapes, losses), "optimizer": optimizer, "sampling": sampling}


class _Examples(torch.utils.data.Dataset):
    """Pre-encoded examples as the HF recipe feeds them: input_ids, attention_mask, labels."""

    def __init__(self, ids: list[list[int]], labels: np.ndarray) -> None:
        self.ids, self.labels = ids, labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.ids[i], "attention_mask": [1] * len(self.ids[i]), "labels": int(self.labels[i])}


def _run_peer(side: str, config: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    import transformers
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    transformers.utils.logging.set_verbosity_error()
    total, untimed = config["untimed_steps"] + config["steps"], config["untimed_steps"]
    padder = DataCollatorWithPadding(data["tokenizer"])
    boundaries: list[tuple[float, float]] = []
    shapes: list[tuple[int, int]] = []
    losses: list[float] = []

    def collate(features):
        batch = padder(features)
        shapes.append((int(batch["attention_mask"].sum()), batch["attention_mask"].numel()))
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= untimed:
                boundaries.append((time.perf_counter(), time.process_time()))

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-trainer-") as out:
        args = _training_args(config, out, total, "group_by_length" if side == "peer_grouped" else "random")
        trainer = Trainer(
            model=data["model"],
            args=args,
            train_dataset=_Examples(data["train"], data["labels"]),
            data_collator=collate,
            callbacks=[Clock()],
        )
        trainer.remove_callback(PrinterCallback)
        torch.set_num_threads(config["threads"])
        trainer.train()
    if not losses or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"peer logged no finite loss: {losses}")
    return {
        **_measured(config, boundaries, shapes, losses),
        "optimizer": str(getattr(args.optim, "value", args.optim)),
        "sampling": args.train_sampling_strategy,
    }


def _training_args(config: dict[str, Any], out: str, total: int, sampling: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=out,
        max_steps=total,
        per_device_train_batch_size=config["batch_size"],
        learning_rate=config["lr"],
        weight_decay=config["weight_decay"],
        adam_beta1=config["betas"][0],
        adam_beta2=config["betas"][1],
        max_grad_norm=config["clip_norm"],
        warmup_steps=round(config["warmup_ratio"] * total),
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": config["min_lr_ratio"]},
        logging_steps=config["log_every"],
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=config["seed"],
        disable_tqdm=True,
        train_sampling_strategy=sampling,
        bf16=False,
        fp16=False,
    )


# --------------------------------------------------------------------------- orchestration
KEYS = (
    "tokens_per_s",
    "tokens_per_cpu_s",
    "positions_per_s",
    "peak_rss_mb",
    "loss_mean",
    "val_loss",
    "val_accuracy",
    "pad_share",
)


def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs = common.interleave(MODULE, SIDES, config, repeats, common.log)
    m = {side: {k: common.med(r, k) for k in KEYS} for side, r in runs.items()}
    first = runs["ours"][0]
    what = (
        f"backbone {config['backbone']}: {first['model']}, {first['params']:,} params; "
        f"max_length {config['max_length']} ({config['truncation']}), batch {config['batch_size']}, one epoch of "
        f"{config['batch_size'] * (config['untimed_steps'] + config['steps'])} examples, {config['steps']} steps "
        f"timed after {config['untimed_steps']}, fp32, {config['threads']} threads; data: {first['data']}; "
        "tokens = real (non-pad) tokens"
    )

    def loss_note(a: str, b: str) -> str:
        return (
            f"val loss {m[a]['val_loss']:.3f} / {m[b]['val_loss']:.3f}, val acc {m[a]['val_accuracy']:.3f} / "
            f"{m[b]['val_accuracy']:.3f}, padding {m[a]['pad_share']:.1%} / {m[b]['pad_share']:.1%}"
        )

    names = {
        "ours": "lmpipe loop, length buckets",
        "ours_random": "lmpipe loop, random batches",
        "peer": "HF Trainer, random sampler",
        "peer_grouped": "HF Trainer, group_by_length",
    }
    pairs = [
        ("tokens/s", "ours", "peer", f"{loss_note('ours', 'peer')}; {common.load_note(runs)}"),
        ("tokens/s, both length-grouped", "ours", "peer_grouped", loss_note("ours", "peer_grouped")),
        ("tokens/s, loop isolated (both random)", "ours_random", "peer", loss_note("ours_random", "peer")),
    ]
    rows = [
        common.row(
            "finetune_throughput",
            metric,
            names[a],
            names[b],
            round(m[a]["tokens_per_s"], 1),
            round(m[b]["tokens_per_s"], 1),
            "real tokens/s",
            "higher",
            note,
        )
        for metric, a, b, note in pairs
    ]
    rows.append(
        common.row(
            "finetune_throughput",
            "tokens per CPU-second",
            names["ours"],
            names["peer"],
            round(m["ours"]["tokens_per_cpu_s"], 1),
            round(m["peer"]["tokens_per_cpu_s"], 1),
            "real tokens/CPU-s",
            "higher",
            "each side's own process CPU time: steadier than wall time on a shared machine",
        )
    )
    rows.append(
        common.row(
            "finetune_throughput",
            "peak RSS",
            names["ours"],
            names["peer"],
            m["ours"]["peak_rss_mb"],
            m["peer"]["peak_rss_mb"],
            "MiB",
            "lower",
            "ru_maxrss of each side's own process",
        )
    )
    return {"benchmark": "finetune_throughput", "description": what, "rows": rows, "medians": m, "runs": runs}


def own_args(argv: list[str]) -> list[str]:
    """Take `--backbone NAME`, `--threads N` and `--fused` out of argv (the shared CLI does not know them)."""
    global BACKBONE, FUSED, THREADS
    if "--threads" in argv:
        i = argv.index("--threads")
        THREADS, argv = int(argv[i + 1]), argv[:i] + argv[i + 2 :]
    if "--fused" in argv:
        FUSED, argv = True, [a for a in argv if a != "--fused"]
    if "--backbone" in argv:
        i = argv.index("--backbone")
        if i + 1 >= len(argv):
            raise SystemExit("--backbone needs a name (a key of finetune.backbones)")
        BACKBONE = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    return argv


if __name__ == "__main__":
    raise SystemExit(common.main(MODULE, run_side, orchestrate, default_config, own_args(sys.argv[1:])))
