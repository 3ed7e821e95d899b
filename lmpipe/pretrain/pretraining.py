"""Pretraining from scratch, masked-LM or causal-LM: everything `stages.pretrain` runs.

`run_pretrain(params, tokens_dir=..., tokenizer_dir=..., ...)` builds the model of
`params.pretrain.model` for `params.pretrain.objective` and trains it with the one training loop
(lmpipe.train.training), with the same checkpoints, exact resume, DDP, MLflow and lineage either way:
- `mlm`: an encoder (lmpipe.mlm.models) on dynamically masked windows of the packed token arrays
  (lmpipe.mlm.masking), evaluated at every `eval_every` steps with every target [MASK]ed, against
  the unigram reference on the same targets, and the pooled-vector spread that flags a collapsed
  encoder;
- `clm`: a decoder (lmpipe.clm.models) on [CLS]-led windows (lmpipe.clm.batches), evaluated by
  next-token perplexity on fixed held-out windows against unigram and bigram references on the
  same targets; at each evaluation a few fixed prompts are continued (greedy and sampled,
  lmpipe.clm.generation) and logged to MLflow, so a user sees the model learn.
It returns the model with its metrics. The stage and the pretraining-payoff study call it alike.
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

    model: Any
    """The trained masked-LM or causal-LM model (final weights), on the training device."""
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


SAMPLE_PROMPTS = ("this movie was", "the acting is", "i would not recommend")  # continued at each evaluation
SAMPLE_TOKENS = 24  # new tokens per sample


@dataclass
class Objective:
    """What the loop trains for one `pretrain.objective`: batches, model, loss, evaluation, cost."""

    batches: Any
    meta: dict[str, Any]
    model: Any
    module: Any  # what the loop calls: the model wrapped to return its loss
    loss_fn: Any
    evaluate: Any  # module -> held-out metrics
    flops_per_token: float
    parameter_counts: dict[str, int]


def masked_lm(cfg: Any, seed: int, tokens_dir: str | Path, device: Any) -> Objective:
    """The masked-LM encoder, its masked batches and its honest held-out evaluation."""
    batches, meta = masking.MLMBatches.from_tokens_dir(tokens_dir, cfg, seed)
    mlm = models.build_mlm(models.mlm_config(cfg.model, meta["vocab_size"], meta["special_tokens"]), seed)
    val, spread_ids = batches.val_batches(), batches.spread_ids()
    unigram = models.unigram_log_probs(batches.train_tokens, meta["vocab_size"])
    return Objective(
        batches,
        meta,
        mlm,
        models.MaskedLMObjective(mlm),
        models.objective_loss,
        lambda objective: models.evaluate_mlm(objective.mlm, val, device, unigram, spread_ids),
        flops.mlm_flops_per_token(mlm.config, cfg.model.max_length, cfg.mask_prob),
        models.parameter_counts(mlm),
    )


def causal_lm(
    cfg: Any, seed: int, tokens_dir: str | Path, tokenizer_dir: str | Path, device: Any, tracker: Any
) -> Objective:
    """The causal-LM decoder, its windows, its references, and samples logged at each evaluation."""
    from transformers import AutoTokenizer

    from lmpipe.clm import batches as clm_batches
    from lmpipe.clm import generation
    from lmpipe.clm import models as clm_models

    batches, meta = clm_batches.CLMBatches.from_tokens_dir(tokens_dir, cfg, seed)
    lm = clm_models.build_clm(clm_models.clm_config(cfg.model, meta["vocab_size"], meta["special_tokens"]), seed)
    val = batches.val_batches()
    unigram = models.unigram_log_probs(batches.train_tokens, meta["vocab_size"])
    bigram = clm_models.BigramReference.fit(batches.train_tokens, meta["vocab_size"])
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    evaluations = [0]

    def evaluate(objective: Any) -> dict[str, float]:
        metrics = clm_models.evaluate_clm(objective.lm, val, device, unigram, bigram)
        evaluations[0] += 1
        if tracker is not None:
            samples = {
                prompt: {
                    "greedy": generation.generate_text(objective.lm, tokenizer, prompt, max_new_tokens=SAMPLE_TOKENS),
                    "sampled": generation.generate_text(
                        objective.lm,
                        tokenizer,
                        prompt,
                        max_new_tokens=SAMPLE_TOKENS,
                        temperature=1.0,
                        top_p=0.9,
                        seed=seed,
                    ),
                }
                for prompt in SAMPLE_PROMPTS
            }
            tracker.log_dict(samples, f"samples/eval_{evaluations[0]:03d}.json")
        return metrics

    return Objective(
        batches,
        meta,
        lm,
        clm_models.CausalLMObjective(lm),
        clm_models.objective_loss,
        evaluate,
        flops.clm_flops_per_token(lm.config, cfg.model.max_length),
        clm_models.parameter_counts(lm),
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
    """Pretrain the model of `params.pretrain` on `tokens_dir`; see the module docstring."""
    started = time.perf_counter()
    base, cfg = params.base, params.pretrain
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise LmpipeError(f"{tokenizer_dir}/tokenizer.json: file not found (run the tokenize stage first)")
    info, device = distributed.init_from_env(device)
    if cfg.objective == "clm":
        objective = causal_lm(cfg, base.seed, tokens_dir, tokenizer_dir, device, tracker if info.is_main else None)
    else:
        objective = masked_lm(cfg, base.seed, tokens_dir, device)
    precision = training.resolve_precision(cfg.loop.precision, device)
    peak, peak_source = flops.peak_flops(base.peak_flops, device, precision)
    fingerprint = json.dumps(
        {
            "base": base.model_dump(exclude={"experiment", "peak_flops"}),
            "pretrain": cfg.model_dump(mode="json"),
            "tokens": dvc_md5(tokens_dir),
            "tokenizer": dvc_md5(tokenizer_dir),
        },
        sort_keys=True,
    )
    result = training.train(
        objective.module,
        loss_fn=objective.loss_fn,
        batch_at=objective.batches.batch_at,
        evaluate=objective.evaluate,
        config=train_config(params),
        device=device,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        tracker=tracker,
        flops_per_token=objective.flops_per_token,
        peak_flops=peak,
        curves_dir=curves_dir,
        perf_curve=perf_curve,
        desc="pretrain",
    )
    if not info.is_main:
        return Pretrained(objective.model, {}, False)
    peak = max(peak, flops.peak_flops(base.peak_flops, device, precision)[0])  # a busy second reads low
    metrics = {
        **result.final_metrics,
        "steps": result.steps,
        "tokens_per_s": result.tokens_per_s,
        "mfu": flops.mfu(result.tokens_per_s, objective.flops_per_token, peak, info.world_size),
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "flops_per_token": objective.flops_per_token,
        "precision": precision,
        "world_size": info.world_size,
        "train_seconds": result.train_seconds,
        "seconds": time.perf_counter() - started,
        "resumed_from": result.resumed_from,
        **{f"params_{k}": v for k, v in objective.parameter_counts.items()},
    }
    return Pretrained(objective.model, metrics, True)


def headline(metrics: dict[str, Any]) -> dict[str, float]:
    """headline.json, what `dvc metrics show` prints for pretraining: held-out perplexity and its
    ratio to the unigram reference on the same targets (below 1: the model uses context); for a
    causal LM also its ratio to the bigram reference (`ppl_vs_bigram`)."""
    head = {"ppl": metrics["val_perplexity"], "ppl_ratio": metrics["perplexity_vs_unigram"]}
    if "perplexity_vs_bigram" in metrics:
        head["ppl_vs_bigram"] = metrics["perplexity_vs_bigram"]
    return head
