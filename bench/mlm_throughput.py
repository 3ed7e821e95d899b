"""Masked-LM pretraining throughput: our loop vs the HF Trainer, side by side.

Sides (each in its own fresh process, interleaved ours, peer, ours-full, ours, peer, ...):

- `ours`: `lmpipe.train.training.train` on `lmpipe.mlm.models.MaskedLMObjective` (the MLM head runs on
  the masked rows only) fed by `lmpipe.mlm.masking.MLMBatches` (windows + BERT masking), exactly as
  `stages/pretrain.py` wires them.
- `peer`: `transformers.Trainer` + `DataCollatorForLanguageModeling` on a `BertForMaskedLM`
  (`labels=` loss: the vocabulary projection on every position), its default optimizer
  (`adamw_torch_fused`), a sequential sampler over the SAME unmasked windows, step for step.
- `ours_full`: our loop with the stock `BertForMaskedLM(labels=...)` loss (full head): the same
  loop as `ours`, so `ours / ours_full` isolates what the masked-only head buys and
  `ours_full / peer` what the loop itself costs or saves.

Same for all: the BertConfig of params.yaml `pretrain.model` (built by `lmpipe.mlm.models.
mlm_config`, same seed, so the same initial weights), vocab and special ids of `data/tokens`
(else 8,000 random ids), batch x sequence, lr / betas / weight decay / clipping / warmup from
params, a cosine schedule to 10% of the peak, fp32, 2 torch threads, `lmpipe.core.stage.setup_torch`
(seeded, deterministic kernels). Timing: wall time from the end of warm-up step W to the end of
the last step (data, forward, backward, clipping, optimizer, logging included; no evaluation or
checkpoint in the window). MFU = tokens/s x `lmpipe.train.flops.mlm_flops_per_token` (the head counted
where it runs) / the peak of `lmpipe.train.flops.measure_peak_flops` probed in the same process.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import common

MODULE = "bench.mlm_throughput"
TOKENS = Path("data/tokens")
TOKENIZER = Path("models/tokenizer")
SIDES = ("ours", "peer", "ours_full")
SPECIAL = {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}  # only for the random-id stand-in
FUSED = False  # `--fused`: our loop with TrainConfig(fused=True) (the peer's adamw_torch_fused is its default)


def default_config(quick: bool = False) -> dict[str, Any]:
    from lmpipe.core.params import load_params

    params = load_params(common.ROOT / "params.yaml")
    pre = params.pretrain
    arch = pre.model.model_dump()
    config = {
        "arch": arch,
        "vocab_size": 8000,  # used only when data/tokens is missing (random ids)
        "batch_size": pre.loop.batch_size,
        "warmup_steps": 3,  # the first steps allocate and fault pages in: not timed
        "steps": 15,  # timed steps; tokens/s from the median step time (~1-2.5 s per step)
        "lr": pre.optim.lr,
        "betas": list(pre.optim.betas),
        "weight_decay": pre.optim.weight_decay,
        "clip_norm": pre.optim.clip_norm,
        "min_lr_ratio": pre.optim.min_lr_ratio,
        "mask_prob": pre.mask_prob,
        "mask_replace": pre.mask_replace,
        "random_replace": pre.random_replace,
        "seed": params.base.seed,
        "threads": common.THREADS,
        "tokens_dir": str(TOKENS),
        "tokenizer_dir": str(TOKENIZER),
        "peak_seconds": 1.0,
        "fused": FUSED or pre.optim.fused,  # the AdamW the pipeline runs (params); --fused forces the fused kernel
    }
    if quick:
        config.update(
            arch={
                **arch,
                "num_layers": 1,
                "hidden_size": 32,
                "num_heads": 2,
                "intermediate_size": 64,
                "max_length": 16,
            },
            vocab_size=200,
            batch_size=4,
            warmup_steps=1,
            steps=2,
            tokens_dir="",
            tokenizer_dir="",
            peak_seconds=0.05,
            threads=1,
        )
    return config


# --------------------------------------------------------------------------- data shared by both sides
def load_tokens(config: dict[str, Any]) -> tuple[Any, dict[str, int], int, str]:
    """(flat token ids, special ids, vocab size, source): data/tokens if present, else random ids."""
    import json

    import numpy as np

    tokens_dir = Path(config["tokens_dir"]) if config.get("tokens_dir") else None
    if tokens_dir is not None and (tokens_dir / "meta.json").is_file():
        from lmpipe.tokenize.tokenization import load_token_split

        meta = json.loads((tokens_dir / "meta.json").read_text())
        tokens, _ = load_token_split(tokens_dir, "train")
        return tokens, dict(meta["special_tokens"]), int(meta["vocab_size"]), f"{tokens_dir} (real tokens)"
    vocab = int(config["vocab_size"])
    window = config["arch"]["max_length"] - 2
    need = (config["warmup_steps"] + config["steps"]) * config["batch_size"] * window * 4
    rng = np.random.default_rng(config["seed"])
    tokens = rng.integers(len(SPECIAL), vocab, size=max(need, 4 * window), dtype=np.int64).astype(np.uint16)
    return tokens, dict(SPECIAL), vocab, f"random ids (vocab {vocab}; {TOKENS} missing)"


def make_batches(config: dict[str, Any], tokens: Any, special: dict[str, int], vocab: int):
    from lmpipe.mlm import masking

    masking_config = masking.MaskingConfig(
        config["mask_prob"],
        config["mask_replace"],
        config["random_replace"],
        special["mask"],
        vocab,
        tuple(sorted(set(special.values()))),
    )
    return masking.MLMBatches(
        tokens,
        tokens,
        max_length=config["arch"]["max_length"],
        batch_size=config["batch_size"],
        grad_accum=1,
        eval_batches=1,
        seed=config["seed"],
        cls_id=special["cls"],
        sep_id=special["sep"],
        masking=masking_config,
    )


def build_model(config: dict[str, Any], vocab: int, special: dict[str, int]):
    from lmpipe.core.params import Architecture
    from lmpipe.mlm import models

    return models.build_mlm(models.mlm_config(Architecture(**config["arch"]), vocab, special), config["seed"])


class FullHeadObjective(torch.nn.Module):
    """forward(input_ids, labels) -> BertForMaskedLM(labels=...).loss: the head on every position."""

    def __init__(self, mlm) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, labels, attention_mask=None):
        return self.mlm(input_ids=input_ids, labels=labels, attention_mask=attention_mask).loss


def _summary(result: dict[str, Any]) -> str:
    return f"{result['tokens_per_s']:.0f} tokens/s, loss {result['loss_mean']:.3f}, {result['peak_rss_mb']:.0f} MiB"


# --------------------------------------------------------------------------- the sides
def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    from lmpipe.core.stage import setup_torch
    from lmpipe.train import flops

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} (got {side!r})")
    device = setup_torch(config["seed"], config["threads"], "cpu")
    tokens, special, vocab, source = load_tokens(config)
    peak = flops.measure_peak_flops(device, seconds=config["peak_seconds"])
    mlm = build_model(config, vocab, special)
    run = _run_peer if side == "peer" else _run_ours
    result = run(side, config, mlm, tokens, special, vocab)
    seq = config["arch"]["max_length"]
    head_fraction = config["mask_prob"] if side == "ours" else 1.0
    fpt = flops.mlm_flops_per_token(mlm.config, seq, head_fraction)
    result.update(
        side=side,
        data=source,
        vocab_size=vocab,
        peak_flops=peak,
        flops_per_token=fpt,
        mfu=result["tokens_per_s"] * fpt / peak,
        torch_threads=torch.get_num_threads(),
        peak_rss_mb=common.peak_rss_mb(),
    )
    result["summary"] = _summary(result)
    return result


def _measured(config: dict[str, Any], boundaries: list[float], losses: list[float]) -> dict[str, Any]:
    """Throughput from the step boundaries of the measured steps (N + 1 time stamps).

    `tokens_per_s` uses the MEDIAN step time: on a shared machine a few steps stall while
    another process holds a core, and the median ignores them; `tokens_per_s_wall` is total
    tokens / total time.
    """
    steps = config["steps"]
    if len(boundaries) != steps + 1:
        raise RuntimeError(f"expected {steps + 1} step boundaries, got {len(boundaries)}")
    per_step = config["batch_size"] * config["arch"]["max_length"]
    durations = [b - a for a, b in zip(boundaries, boundaries[1:])]
    measured = losses[config["warmup_steps"] :]
    return {
        "tokens_per_s": per_step / common.median(durations),
        "tokens_per_s_wall": per_step * steps / (boundaries[-1] - boundaries[0]),
        "step_seconds": [round(d, 4) for d in durations],
        "boundaries": boundaries,  # perf_counter stamps of this process (bench.profile_pretrain reads them)
        "seconds": boundaries[-1] - boundaries[0],
        "steps_measured": steps,
        "loss_first": losses[0],
        "loss_mean": sum(measured) / len(measured),
        "loss_last": losses[-1],
    }


def loop_pretraining(config: dict[str, Any], objective: Any, loss_fn: Any, batches: Any) -> dict[str, Any]:
    """Our side of a pretraining benchmark: `lmpipe.train.training.train` on `objective` with
    `loss_fn`, fed `batches.batch_at`, with the lr schedule, optimizer settings and clipping of
    `config` (no evaluation, no checkpoint before the end). Returns the measured figures."""
    from lmpipe.train import training

    total = config["warmup_steps"] + config["steps"]
    boundaries: list[float] = []

    def batch_at(step: int, micro: int, rank: int, world: int):
        if step >= config["warmup_steps"]:
            boundaries.append(time.perf_counter())  # a measured step starts (the previous one ended)
        return batches.batch_at(step, micro, rank, world)

    def evaluate(model) -> dict[str, float]:
        boundaries.append(time.perf_counter())  # called once, right after the last step
        return {}

    cfg = training.TrainConfig(
        max_steps=total,
        lr=config["lr"],
        weight_decay=config["weight_decay"],
        betas=tuple(config["betas"]),
        warmup_steps=config["warmup_steps"],
        min_lr_ratio=config["min_lr_ratio"],
        clip_norm=config["clip_norm"],
        eval_every=total,
        checkpoint_every=total,
        log_every=1,
        precision="fp32",
        fused=config.get("fused", False),
    )
    result = training.train(
        objective, loss_fn=loss_fn, batch_at=batch_at, evaluate=evaluate, config=cfg, device=torch.device("cpu")
    )
    losses = [row["loss"] for row in result.history["train"]]
    optimizer = "AdamW fused" if config.get("fused") else "torch.optim.AdamW (defaults: single-tensor on CPU)"
    return {**_measured(config, boundaries, losses), "optimizer": optimizer}


def _run_ours(side: str, config: dict[str, Any], mlm, tokens, special, vocab) -> dict[str, Any]:
    from lmpipe.mlm import models

    objective = models.MaskedLMObjective(mlm) if side == "ours" else FullHeadObjective(mlm)
    return loop_pretraining(config, objective, models.objective_loss, make_batches(config, tokens, special, vocab))


def _peer_tokenizer(config: dict[str, Any], special: dict[str, int], vocab: int):
    """models/tokenizer when the real tokens are used; else a WordPiece vocabulary of placeholders
    with the same special ids (the collator only needs ids, the mask token and the vocab size)."""
    tokenizer_dir = Path(config["tokenizer_dir"]) if config.get("tokenizer_dir") else None
    tokens_dir = Path(config["tokens_dir"]) if config.get("tokens_dir") else None
    if (
        tokenizer_dir
        and tokens_dir
        and (tokens_dir / "meta.json").is_file()
        and (tokenizer_dir / "tokenizer.json").is_file()
    ):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    from tokenizers import Tokenizer, models

    from lmpipe.tokenize.tokenization import SPECIAL_TOKENS, to_transformers

    names = {i: f"w{i}" for i in range(vocab)}
    for key, i in special.items():
        names[i] = SPECIAL_TOKENS[key]
    tok = Tokenizer(models.WordPiece({name: i for i, name in names.items()}, unk_token=SPECIAL_TOKENS["unk"]))
    return to_transformers(tok, "wordpiece", True, model_max_length=config["arch"]["max_length"])


def trainer_pretraining(config: dict[str, Any], model, rows: Any, collator: Any) -> dict[str, Any]:
    """The peer side of a pretraining benchmark: `transformers.Trainer` on `model`, fed `rows` (one
    window per row, in our loop's step order: a sequential sampler) through `collator`, with the
    lr schedule, optimizer settings and clipping of `config`. Returns the measured figures
    (`_measured`), the tokens the Trainer counted and its optimizer."""
    import tempfile

    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    transformers.utils.logging.set_verbosity_error()
    total = config["warmup_steps"] + config["steps"]

    class Windows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(rows)

        def __getitem__(self, i: int) -> dict[str, list[int]]:
            return {"input_ids": rows[i].tolist()}

    boundaries: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= config["warmup_steps"]:
                boundaries.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-trainer-") as out:
        args = TrainingArguments(
            output_dir=out,
            max_steps=total,
            per_device_train_batch_size=config["batch_size"],
            learning_rate=config["lr"],
            weight_decay=config["weight_decay"],
            adam_beta1=config["betas"][0],
            adam_beta2=config["betas"][1],
            max_grad_norm=config["clip_norm"],
            warmup_steps=config["warmup_steps"],
            lr_scheduler_type="cosine_with_min_lr",
            lr_scheduler_kwargs={"min_lr_rate": config["min_lr_ratio"]},
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to="none",
            use_cpu=True,
            dataloader_num_workers=0,
            seed=config["seed"],
            disable_tqdm=True,
            train_sampling_strategy="sequential",
            include_num_input_tokens_seen="all",
            bf16=False,
            fp16=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Windows(), data_collator=collator, callbacks=[Clock()])
        trainer.remove_callback(PrinterCallback)
        torch.set_num_threads(config["threads"])
        trainer.train()
        optimizer = type(
            trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        ).__name__
    if len(losses) != total or not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"peer logged {len(losses)} losses for {total} steps: {losses}")
    return {
        **_measured(config, boundaries, losses),
        "tokens_run": int(trainer.state.num_input_tokens_seen),
        "optimizer": f"{getattr(args.optim, 'value', args.optim)} ({optimizer})",
    }


def _run_peer(side: str, config: dict[str, Any], mlm, tokens, special, vocab) -> dict[str, Any]:
    import numpy as np
    from transformers import DataCollatorForLanguageModeling

    from lmpipe.mlm import masking

    batches = make_batches(config, tokens, special, vocab)
    total = config["warmup_steps"] + config["steps"]
    # the very windows our loop draws at each step, in step order (masks are the collator's own)
    rows = np.concatenate(
        [
            masking.windows(
                tokens, batches.train_starts(step, 1), batches.window, special["cls"], special["sep"]
            ).numpy()
            for step in range(total)
        ]
    )
    tokenizer = _peer_tokenizer(config, special, vocab)
    if len(tokenizer) != vocab or tokenizer.mask_token_id != special["mask"]:
        raise RuntimeError(
            f"peer tokenizer disagrees with the token data: {len(tokenizer)} ids, "
            f"[MASK]={tokenizer.mask_token_id} vs {vocab}, {special['mask']}"
        )
    collator = DataCollatorForLanguageModeling(
        tokenizer,
        mlm_probability=config["mask_prob"],
        mask_replace_prob=config["mask_replace"],
        random_replace_prob=config["random_replace"],
        seed=config["seed"],
    )
    return trainer_pretraining(config, mlm, rows, collator)


# --------------------------------------------------------------------------- orchestration
def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs = common.interleave(MODULE, SIDES, config, repeats, common.log)
    ours, peer = runs["ours"], runs["peer"]
    m = {
        side: {k: common.med(r, k) for k in ("tokens_per_s", "mfu", "peak_rss_mb", "loss_mean", "loss_first")}
        for side, r in runs.items()
    }
    shape = config["arch"]
    what = (
        f"{shape.get('family', 'bert')} {shape['num_layers']}x{shape['hidden_size']}, "
        f"vocab {ours[0]['vocab_size']}, seq "
        f"{shape['max_length']}, batch {config['batch_size']}, {config['steps']} steps after "
        f"{config['warmup_steps']} warm-up, fp32, {config['threads']} threads; data: {ours[0]['data']}"
    )
    ours_name, peer_name = "lmpipe loop, masked-only head", "HF Trainer + DataCollatorForLanguageModeling"
    loads = common.load_note(runs)
    losses = (
        f"loss ours {m['ours']['loss_mean']:.3f} / full {m['ours_full']['loss_mean']:.3f} / "
        f"peer {m['peer']['loss_mean']:.3f} (mean over measured steps)"
    )
    rows = [
        common.row(
            "mlm_throughput",
            "tokens/s",
            ours_name,
            peer_name,
            round(m["ours"]["tokens_per_s"], 1),
            round(m["peer"]["tokens_per_s"], 1),
            "tokens/s",
            "higher",
            f"{losses}; {loads}",
        ),
        common.row(
            "mlm_throughput",
            "MFU",
            ours_name,
            peer_name,
            round(m["ours"]["mfu"], 4),
            round(m["peer"]["mfu"], 4),
            "fraction of peak",
            "higher",
            f"FLOPs counted where they run (head on {config['mask_prob']:.0%} vs 100% of positions); "
            f"peak {common.median([r['peak_flops'] for r in ours + peer]) / 1e9:.0f} GFLOP/s probed per process",
        ),
        common.row(
            "mlm_throughput",
            "peak RSS",
            ours_name,
            peer_name,
            m["ours"]["peak_rss_mb"],
            m["peer"]["peak_rss_mb"],
            "MiB",
            "lower",
            "ru_maxrss of each side's own process",
        ),
        common.row(
            "mlm_throughput",
            "tokens/s, head isolated",
            "lmpipe loop, masked-only head",
            "lmpipe loop, full head",
            round(m["ours"]["tokens_per_s"], 1),
            round(m["ours_full"]["tokens_per_s"], 1),
            "tokens/s",
            "higher",
            "same loop, only the loss differs",
        ),
        common.row(
            "mlm_throughput",
            "tokens/s, loop isolated",
            "lmpipe loop, full head",
            peer_name,
            round(m["ours_full"]["tokens_per_s"], 1),
            round(m["peer"]["tokens_per_s"], 1),
            "tokens/s",
            "higher",
            f"same full-vocabulary head; optimizer ours {ours[0]['optimizer']}, peer {peer[0]['optimizer']}",
        ),
    ]
    return {"benchmark": "mlm_throughput", "description": what, "rows": rows, "medians": m, "runs": runs}


def own_args(argv: list[str]) -> list[str]:
    """Take `--fused` out of argv (the shared CLI does not know it)."""
    global FUSED
    if "--fused" in argv:
        FUSED, argv = True, [a for a in argv if a != "--fused"]
    return argv


if __name__ == "__main__":
    raise SystemExit(common.main(MODULE, run_side, orchestrate, default_config, own_args(sys.argv[1:])))
