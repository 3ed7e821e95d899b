"""Stage `pretrain`: train a small BERT encoder from scratch with masked-LM.

Reads `data/tokens/` (train.bin, val.bin, meta.json) and `models/tokenizer/`. Writes
`models/pretrained/` (a BertForMaskedLM folder, safetensors, tokenizer files beside it),
`checkpoints/pretrain/` (the resume point), `reports/pretrain/metrics.json`,
`train_curve.csv` and `eval_curve.csv`.

Features:
- windows of max_length - 2 packed tokens wrapped [CLS] ... [SEP], dynamic BERT masking
  (15% / 80-10-10, special tokens never masked), a pure function of (seed, step, shard);
- the MLM head runs on masked positions only (same loss, far fewer FLOPs);
- the shared loop (lmpipe.training): AdamW, warmup + cosine, accumulation, clipping, bf16
  autocast on CUDA, checkpoints resumed exactly after a crash or kill (SIGTERM saves the step
  in flight), DDP under `torchrun --nproc_per_node N -m stages.pretrain`;
- held-out loss and perplexity on fixed validation windows; tokens/s and MFU (peak from
  base.peak_flops or a matmul probe).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from lmpipe import distributed, flops, masking, models, training
from lmpipe.errors import LmpipeError
from lmpipe.io import atomic_dir, write_json
from lmpipe.lineage import dvc_md5
from lmpipe.params import load_params
from lmpipe.stage import run, setup_torch
from lmpipe.tracking import stage_run

TOKENS, TOKENIZER = Path("data/tokens"), Path("models/tokenizer")
OUT, CHECKPOINTS, REPORTS = Path("models/pretrained"), Path("checkpoints/pretrain"), Path("reports/pretrain")


def main() -> dict:
    started = time.perf_counter()
    params = load_params()
    base, cfg, optim, loop = params.base, params.pretrain, params.pretrain.optim, params.pretrain.loop
    if not (TOKENIZER / "tokenizer.json").is_file():
        raise LmpipeError(f"{TOKENIZER}/tokenizer.json: file not found (run the tokenize stage first)")
    batches, meta = masking.MLMBatches.from_tokens_dir(TOKENS, cfg, base.seed)
    info, device = distributed.init_from_env(setup_torch(base.seed, base.threads, base.device))
    mlm = models.build_mlm(models.mlm_config(cfg.model, meta["vocab_size"], meta["special_tokens"]["pad"]), base.seed)
    config = training.TrainConfig(
        max_steps=loop.max_steps, grad_accum=loop.grad_accum, lr=optim.lr, weight_decay=optim.weight_decay,
        betas=optim.betas, warmup_steps=optim.warmup_steps, min_lr_ratio=optim.min_lr_ratio, clip_norm=optim.clip_norm,
        eval_every=loop.eval_every, checkpoint_every=loop.checkpoint_every, log_every=loop.log_every,
        precision=loop.precision)
    precision = training.resolve_precision(loop.precision, device)
    peak, peak_source = flops.peak_flops(base.peak_flops, device, precision)
    flops_per_token = flops.mlm_flops_per_token(mlm.config, cfg.model.max_length, cfg.mask_prob)
    fingerprint = json.dumps({"base": base.model_dump(exclude={"experiment", "peak_flops"}),
                              "pretrain": cfg.model_dump(mode="json"), "tokens": dvc_md5(TOKENS),
                              "tokenizer": dvc_md5(TOKENIZER)}, sort_keys=True)
    val = batches.val_batches()
    with stage_run("pretrain", params, sections=("pretrain",), inputs=(str(TOKENS), str(TOKENIZER)),
                   outputs=(str(OUT), str(CHECKPOINTS))) as tracker:
        result = training.train(
            models.MaskedLMObjective(mlm), loss_fn=models.objective_loss, batch_at=batches.batch_at,
            evaluate=lambda objective: models.evaluate_mlm(objective.mlm, val, device), config=config,
            device=device, checkpoint_dir=CHECKPOINTS, fingerprint=fingerprint, tracker=tracker,
            flops_per_token=flops_per_token, peak_flops=peak, curves_dir=REPORTS, desc="pretrain")
        if not info.is_main:
            return {}
        with atomic_dir(OUT) as tmp:
            models.save_mlm(mlm, TOKENIZER, tmp)
        training.finish_checkpoint(CHECKPOINTS, result.steps)
        peak = max(peak, flops.peak_flops(base.peak_flops, device, precision)[0])  # a busy second reads low
        metrics = {**result.final_metrics, "steps": result.steps, "tokens_per_s": result.tokens_per_s,
                   "mfu": flops.mfu(result.tokens_per_s, flops_per_token, peak, info.world_size),
                   "peak_flops": peak, "peak_flops_source": peak_source,
                   "flops_per_token": flops_per_token, "precision": precision, "world_size": info.world_size,
                   "train_seconds": result.train_seconds, "seconds": time.perf_counter() - started,
                   "resumed_from": result.resumed_from,
                   **{f"params_{k}": v for k, v in models.parameter_counts(mlm).items()}}
        write_json(REPORTS / "metrics.json", metrics)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(OUT / "config.json")
    return metrics


if __name__ == "__main__":
    try:
        run(main)
    finally:
        distributed.shutdown()
