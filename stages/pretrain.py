"""Stage `pretrain`: train a small model from scratch, a masked-LM encoder or a causal-LM decoder.

Reads `data/tokens/` (train.bin, val.bin, meta.json) and `models/tokenizer/`. Writes
`models/pretrained/` (a <Family>ForMaskedLM or, under `pretrain.objective: clm`, a
LlamaForCausalLM folder, safetensors, tokenizer files beside it),
`checkpoints/pretrain/` (the resume point), `reports/pretrain/metrics.json`,
`train_curve.csv` and `eval_curve.csv`.

Features:
- encoder families bert / roformer / modernbert (stock transformers classes, Auto-loadable);
- windows of max_length - 2 packed tokens wrapped [CLS] ... [SEP], dynamic BERT masking
  (mask rate and the 80/10/10 split are params; special tokens never masked), a pure
  function of (seed, step, shard); the MLM head runs on masked positions only;
- the shared loop (lmpipe.train.training): AdamW, warmup + cosine, accumulation, clipping, bf16
  autocast on CUDA, checkpoints resumed exactly after a crash or kill (SIGTERM saves the step
  in flight), DDP under `torchrun --nproc_per_node N -m stages.pretrain`;
- honest held-out metrics on fixed validation windows: every target [MASK]ed, perplexity
  against a unigram reference on exactly those targets (`perplexity_vs_unigram` < 1 means the
  encoder uses context), and a collapse monitor (`pooled_spread`; below
  `pretrain.collapse_spread` the run warns and is tagged `lmpipe.collapsed=true`);
- tokens/s and MFU (peak from base.peak_flops or a matmul probe);
- `pretrain.objective: clm` (family llama): [CLS]-led windows, next-token loss, held-out
  perplexity against unigram and bigram references on the same targets, generated samples of a
  few fixed prompts logged to MLflow at each evaluation (lmpipe.pretrain.pretraining).
"""

from __future__ import annotations

from pathlib import Path

from lmpipe.core.io import atomic_dir, write_json
from lmpipe.core.lineage import TAG_COLLAPSED
from lmpipe.core.params import load_params
from lmpipe.core.reports import HEADLINE_FILE, perf_curve_file, write_stage_reports
from lmpipe.core.stage import run, setup_torch
from lmpipe.core.tracking import stage_run
from lmpipe.mlm import models
from lmpipe.pretrain import pretraining
from lmpipe.train import distributed, training

TOKENS, TOKENIZER = Path("data/tokens"), Path("models/tokenizer")
OUT, CHECKPOINTS, REPORTS = Path("models/pretrained"), Path("checkpoints/pretrain"), Path("reports/pretrain")


def main() -> dict:
    params = load_params()
    device = setup_torch(params.base.seed, params.base.threads, params.base.device)
    with stage_run(
        "pretrain",
        params,
        sections=("pretrain",),
        inputs=(str(TOKENS), str(TOKENIZER)),
        outputs=(str(OUT), str(CHECKPOINTS)),
    ) as tracker:
        done = pretraining.run_pretrain(
            params,
            tokens_dir=TOKENS,
            tokenizer_dir=TOKENIZER,
            device=device,
            checkpoint_dir=CHECKPOINTS,
            curves_dir=REPORTS,
            perf_curve=perf_curve_file("pretrain"),
            tracker=tracker,
        )
        if not done.is_main:
            return {}
        with atomic_dir(OUT) as tmp:
            models.save_mlm(done.model, TOKENIZER, tmp)  # any HF model: safetensors + the tokenizer files
        training.finish_checkpoint(CHECKPOINTS, done.metrics["steps"])
        write_stage_reports("pretrain", REPORTS, done.metrics)
        write_json(REPORTS / HEADLINE_FILE, pretraining.headline(done.metrics))
        if params.pretrain.objective == "mlm":  # pooled_spread watches an encoder's vectors
            collapsed = models.collapsed(done.metrics, params.pretrain.collapse_spread)
            tracker.set_tags({TAG_COLLAPSED: str(collapsed).lower()})
        tracker.log_metrics({k: v for k, v in done.metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(OUT / "config.json")
    return done.metrics


if __name__ == "__main__":
    try:
        run(main)
    finally:
        distributed.shutdown()
