"""Masked-LM pretraining of the encoder from scratch: everything `stages.pretrain` runs.

`run_pretrain(params, tokens_dir=..., tokenizer_dir=..., ...)` builds the encoder of
`params.pretrain.model` (lmpipe.mlm.models), trains it with the one training loop
(lmpipe.train.training) on dynamically masked windows of the packed token arrays (lmpipe.mlm.masking),
evaluates it honestly at every `eval_every` steps (every target [MASK]ed; the unigram
reference on the same targets; the pooled-vector spread that flags a collapsed encoder), and
returns the model with its metrics. The stage and the pretraining-payoff study call it alike.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import dvc_md5
from lmpipe.mlm import masking, models
from lmpipe.train import distributed, flops, training


@dataclass
class Pretrained:
    """The outcome of `run_pretrain`."""

    mlm: Any
    """The trained masked-LM model (final weights), on the training device."""
    metrics: dict[str, Any]
    """reports/pretrain/metrics.json: final held-out metrics, throughput, MFU, parameter counts."""
    is_main: bool
    """False on the non-zero ranks of a DDP run: they write nothing."""


def train_config(params: Any) -> training.TrainConfig:
    """The shared loop's TrainConfig from the `pretrain` params section."""
    optim, loop = params.pretrain.optim, params.pretrain.loop
    return training.TrainConfig(
        max_steps=loop.max_steps,
        grad_accum=loop.grad_accum,
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        betas=optim.betas,
        warmup_steps=optim.warmup_steps,
        min_lr_ratio=optim.min_lr_ratio,
        clip_norm=optim.clip_norm,
        fused=optim.fused,
        eval_every=loop.eval_every,
        checkpoint_every=loop.checkpoint_every,
        log_every=loop.log_every,
        precision=loop.precision,
    )


def run_pretrain(
    params: Any,
    *,
    tokens_dir: str | Path,
    tokenizer_dir: str | Path,
    device: Any,
    checkpoint_dir: str | Path | None = None,
    curves_dir: str | Path | None = None,
    perf_curve: str | Path | None = None,
    tracker: Any = None,
) -> Pretrained:
    """Pretrain the encoder of `params.pretrain` on `tokens_dir`; see the module docstring."""
    started = time.perf_counter()
    base, cfg = params.base, params.pretrain
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise LmpipeError(f"{tokenizer_dir}/tokenizer.json: file not found (run the tokenize stage first)")
    batches, meta = masking.MLMBatches.from_tokens_dir(tokens_dir, cfg, base.seed)
    info, device = distributed.init_from_env(device)
    mlm = models.build_mlm(models.mlm_config(cfg.model, meta["vocab_size"], meta["special_tokens"]), base.seed)
    precision = training.resolve_precision(cfg.loop.precision, device)
    peak, peak_source = flops.peak_flops(base.peak_flops, device, precision)
    flops_per_token = flops.mlm_flops_per_token(mlm.config, cfg.model.max_length, cfg.mask_prob)
    fingerprint = json.dumps(
        {
            "base": base.model_dump(exclude={"experiment", "peak_flops"}),
            "pretrain": cfg.model_dump(mode="json"),
            "tokens": dvc_md5(tokens_dir),
            "tokenizer": dvc_md5(tokenizer_dir),
        },
        sort_keys=True,
    )
    val, spread_ids = batches.val_batches(), batches.spread_ids()
    unigram = models.unigram_log_probs(batches.train_tokens, meta["vocab_size"])
    result = training.train(
        models.MaskedLMObjective(mlm),
        loss_fn=models.objective_loss,
        batch_at=batches.batch_at,
        evaluate=lambda objective: models.evaluate_mlm(objective.mlm, val, device, unigram, spread_ids),
        config=train_config(params),
        device=device,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        tracker=tracker,
        flops_per_token=flops_per_token,
        peak_flops=peak,
        curves_dir=curves_dir,
        perf_curve=perf_curve,
        desc="pretrain",
    )
    if not info.is_main:
        return Pretrained(mlm, {}, False)
    peak = max(peak, flops.peak_flops(base.peak_flops, device, precision)[0])  # a busy second reads low
    metrics = {
        **result.final_metrics,
        "steps": result.steps,
        "tokens_per_s": result.tokens_per_s,
        "mfu": flops.mfu(result.tokens_per_s, flops_per_token, peak, info.world_size),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "flops_per_token": flops_per_token,
        "precision": precision,
        "world_size": info.world_size,
        "train_seconds": result.train_seconds,
        "seconds": time.perf_counter() - started,
        "resumed_from": result.resumed_from,
        **{f"params_{k}": v for k, v in models.parameter_counts(mlm).items()},
    }
    return Pretrained(mlm, metrics, True)


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """headline.json, what `dvc metrics show` prints for pretraining: held-out perplexity and its
    ratio to the unigram reference on the same masked targets (below 1: the encoder uses context)."""
    return {"ppl": metrics["val_perplexity"], "ppl_ratio": metrics["perplexity_vs_unigram"]}
