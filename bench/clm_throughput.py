"""Causal-LM pretraining throughput: our loop vs the HF Trainer, side by side.

Sides (each in its own fresh process, interleaved ours, peer, ours, peer, ...):

- `ours`: `lmpipe.train.training.train` on `lmpipe.clm.models.CausalLMObjective` (loss_fn
  `lmpipe.clm.models.objective_loss`: the LM head on the T - 1 positions that have a target) fed by
  `lmpipe.clm.batches.CLMBatches` ([CLS]-led windows), exactly what
  `lmpipe.pretrain.pretraining.causal_lm` sets up for `pretrain.objective: clm`.
- `peer`: `transformers.Trainer` + `DataCollatorForLanguageModeling(tokenizer, mlm=False)` (labels =
  input_ids, [PAD] targets ignored) on the same `LlamaForCausalLM` (`labels=` loss: the head on all T
  positions, shifted inside the model), its default optimizer (`adamw_torch_fused`), a sequential
  sampler over the SAME windows our loop draws, step for step.

Same for both: the LlamaConfig of params.yaml `pretrain.model` with family `llama` (built by
`lmpipe.clm.models.clm_config`, same seed, so the same initial weights), vocab and special ids of
`data/tokens` (else 8,000 random ids), batch x sequence, lr / betas / weight decay / clipping /
warmup from params, a cosine schedule to `min_lr_ratio` of the peak, fp32, 2 torch threads,
`lmpipe.core.stage.setup_torch` (seeded, deterministic kernels). Configuration, data, timing and the
peer's tokenizer are `bench.mlm_throughput`'s (see its docstring). Same work: the first step's loss
(same weights, same windows, before any update) must match; the last step's loss differs only by
the schedules' warm-up (HF's starts at lr 0, ours at lr / (warmup + 1)). Tokens are counted where
each side counts them (our loop's loss_fn; the Trainer's `num_input_tokens_seen`).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from bench import common, mlm_throughput

MODULE = "bench.clm_throughput"
SIDES = ("ours", "peer")
MASKING_KEYS = ("mask_prob", "mask_replace", "random_replace")  # mlm_throughput's, meaningless here


def default_config(quick: bool = False) -> dict[str, Any]:
    """mlm_throughput's configuration (the params.yaml pretrain shape, loop and optimizer) with a
    llama decoder in place of the encoder; `quick`: the micro model, a handful of steps."""
    config = {k: v for k, v in mlm_throughput.default_config(quick).items() if k not in MASKING_KEYS}
    config["arch"] = {**config["arch"], "family": "llama"}
    if quick:
        config.update(warmup_steps=1, steps=4)
    return config


def build_model(config: dict[str, Any], vocab: int, special: dict[str, int]):
    from lmpipe.clm import models
    from lmpipe.core.params import Architecture

    return models.build_clm(models.clm_config(Architecture(**config["arch"]), vocab, special), config["seed"])


def make_batches(config: dict[str, Any], tokens: Any, special: dict[str, int]):
    from lmpipe.clm.batches import CLMBatches

    return CLMBatches(
        tokens,
        tokens,
        max_length=config["arch"]["max_length"],
        batch_size=config["batch_size"],
        grad_accum=1,
        eval_batches=1,
        seed=config["seed"],
        cls_id=special["cls"],
    )


def _summary(result: dict[str, Any]) -> str:
    return (
        f"{result['tokens_per_s']:.0f} tokens/s, loss {result['loss_first']:.3f} -> {result['loss_last']:.3f}, "
        f"{result['peak_rss_mb']:.0f} MiB"
    )


# --------------------------------------------------------------------------- the sides
def run_side(side: str, config: dict[str, Any]) -> dict[str, Any]:
    from lmpipe.core.stage import setup_torch
    from lmpipe.train import flops

    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} (got {side!r})")
    device = setup_torch(config["seed"], config["threads"], "cpu")
    tokens, special, vocab, source = mlm_throughput.load_tokens(config)
    peak = flops.measure_peak_flops(device, seconds=config["peak_seconds"])
    lm = build_model(config, vocab, special)
    run = _run_peer if side == "peer" else _run_ours
    result = run(config, lm, tokens, special, vocab)
    seq = config["arch"]["max_length"]
    fpt = flops.clm_flops_per_token(lm.config, seq)
    if side == "peer":  # its head also runs on the last position, which has no target
        fpt += 6.0 * lm.config.hidden_size * lm.config.vocab_size / seq
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


def _run_ours(config: dict[str, Any], lm, tokens, special, vocab) -> dict[str, Any]:
    from lmpipe.clm import models

    counted = [0]

    def loss_fn(model, batch):
        loss, n_tokens = models.objective_loss(model, batch)
        counted[0] += int(n_tokens)  # what the loop counts for its own tokens/s
        return loss, n_tokens

    batches = make_batches(config, tokens, special)
    result = mlm_throughput.loop_pretraining(config, models.CausalLMObjective(lm), loss_fn, batches)
    return {**result, "tokens_run": counted[0]}


def _run_peer(config: dict[str, Any], lm, tokens, special, vocab) -> dict[str, Any]:
    from transformers import DataCollatorForLanguageModeling

    batches = make_batches(config, tokens, special)
    total = config["warmup_steps"] + config["steps"]
    # the very windows our loop draws at each step, in step order
    rows = torch.cat([batches.batch_at(step, 0, 0, 1)["input_ids"] for step in range(total)]).numpy()
    tokenizer = mlm_throughput._peer_tokenizer(config, special, vocab)
    if len(tokenizer) != vocab or tokenizer.pad_token_id != special["pad"]:
        raise RuntimeError(
            f"peer tokenizer disagrees with the token data: {len(tokenizer)} ids, "
            f"[PAD]={tokenizer.pad_token_id} vs {vocab}, {special['pad']}"
        )
    return mlm_throughput.trainer_pretraining(config, lm, rows, DataCollatorForLanguageModeling(tokenizer, mlm=False))


# --------------------------------------------------------------------------- orchestration
def orchestrate(config: dict[str, Any], repeats: int) -> dict[str, Any]:
    runs = common.interleave(MODULE, SIDES, config, repeats, common.log)
    ours, peer = runs["ours"], runs["peer"]
    keys = ("tokens_per_s", "mfu", "peak_rss_mb", "loss_first", "loss_last", "tokens_run")
    m = {side: {k: common.med(r, k) for k in keys} for side, r in runs.items()}
    shape = config["arch"]
    steps = config["warmup_steps"] + config["steps"]
    what = (
        f"{shape['family']} {shape['num_layers']}x{shape['hidden_size']}, vocab {ours[0]['vocab_size']}, seq "
        f"{shape['max_length']}, batch {config['batch_size']}, {config['steps']} steps after "
        f"{config['warmup_steps']} warm-up, fp32, {config['threads']} threads; data: {ours[0]['data']}"
    )
    ours_name, peer_name = "lmpipe loop, CausalLMObjective", "HF Trainer + DataCollatorForLanguageModeling(mlm=False)"
    same_first = math.isclose(m["ours"]["loss_first"], m["peer"]["loss_first"], rel_tol=1e-4)
    same_tokens = m["ours"]["tokens_run"] == m["peer"]["tokens_run"]
    rows = [
        common.row(
            "clm_throughput",
            "tokens/s",
            ours_name,
            peer_name,
            round(m["ours"]["tokens_per_s"], 1),
            round(m["peer"]["tokens_per_s"], 1),
            "tokens/s",
            "higher",
            f"tokens run {m['ours']['tokens_run']:.0f} / {m['peer']['tokens_run']:.0f}"
            f"{'' if same_tokens else ' (DIFFERENT)'}; optimizer ours {ours[0]['optimizer']}, "
            f"peer {peer[0]['optimizer']}; {common.load_note(runs)}",
        ),
        common.row(
            "clm_throughput",
            "MFU",
            ours_name,
            peer_name,
            round(m["ours"]["mfu"], 4),
            round(m["peer"]["mfu"], 4),
            "fraction of peak",
            "higher",
            f"FLOPs counted where they run (head on T-1 vs T positions); "
            f"peak {common.median([r['peak_flops'] for r in ours + peer]) / 1e9:.0f} GFLOP/s probed per process",
        ),
        common.row(
            "clm_throughput",
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
            "clm_throughput",
            f"train loss at step {steps}",
            ours_name,
            peer_name,
            round(m["ours"]["loss_last"], 4),
            round(m["peer"]["loss_last"], 4),
            "nats/token",
            "equal",
            f"same work: step-1 loss {m['ours']['loss_first']:.4f} / {m['peer']['loss_first']:.4f}"
            f"{'' if same_first else ' (DIFFERENT: not the same weights or windows)'}; the last differs by the "
            "schedules' warm-up only (HF from lr 0)",
        ),
    ]
    return {"benchmark": "clm_throughput", "description": what, "rows": rows, "medians": m, "runs": runs}


if __name__ == "__main__":
    raise SystemExit(common.main(MODULE, run_side, orchestrate, default_config, mlm_throughput.own_args(sys.argv[1:])))
