"""The causal (GPT-style) LM we pretrain: config, objective, references, held-out perplexity, export.

- `clm_config` builds the transformers config of a decoder family from `params.pretrain.model`
  and the tokenizer's vocabulary and special ids (never hard-coded): `llama` (rotary positions,
  pre-RMSNorm, SwiGLU feed-forward, no biases, input and output embeddings tied). A stock
  transformers class, so the saved folder loads with `AutoModelForCausalLM` offline, with no
  remote code.
- `next_token_loss` is the mean cross-entropy of predicting token t+1 from tokens <= t. The LM
  head runs on every position but the last (which has no target); targets that are [PAD] (or
  masked out by `attention_mask`) carry no loss. It equals `LlamaForCausalLM(labels=input_ids)`'s
  loss on an unpadded batch (tests/unit/test_clm.py).
- `CausalLMObjective` wraps the model so the shared training loop (and DDP) calls one forward
  that returns that loss; `objective_loss` is the loop's loss_fn.
- References on exactly the held-out targets the model is scored on: the add-one unigram of
  lmpipe.mlm.models and `BigramReference` (Dirichlet-smoothed toward that unigram). A causal LM
  that does not beat the bigram has learned no more than which word follows which.
- `save_clm` writes a folder `AutoModelForCausalLM.from_pretrained` loads (safetensors) with the
  tokenizer files beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from lmpipe.core.errors import LmpipeError
from lmpipe.mlm.masking import IGNORE
from lmpipe.mlm.models import save_mlm, unigram_log_probs

FAMILIES = ("llama",)
ALPHA_GRID = tuple(float(10.0**e) for e in np.arange(-1.0, 4.01, 0.25))
"""Dirichlet prior strengths `BigramReference.fit` chooses from: 0.1 ... 10,000, 4 per decade."""

__all__ = [
    "BigramReference",
    "CausalLMObjective",
    "build_clm",
    "clm_config",
    "evaluate_clm",
    "next_token_loss",
    "objective_loss",
    "parameter_counts",
    "save_clm",
    "target_mask",
    "unigram_log_probs",
]


def clm_config(arch: Any, vocab_size: int, special: dict[str, int]) -> PretrainedConfig:
    """The decoder config of `arch.family` from a params Architecture (num_layers, hidden_size,
    num_heads, intermediate_size, max_length, dropout) and the tokenizer's vocabulary size and
    special ids (`cls`, `sep`, `pad` keys, as in data/tokens/meta.json).

    [CLS] is the beginning-of-sequence token (every training window starts with it), [SEP] the
    end-of-sequence one, [PAD] the padding. Every head has its own keys and values (no grouped
    queries: at 2 heads there is nothing to share). LlamaConfig has dropout on the attention
    probabilities only: `arch.dropout` goes there, hidden states get none.
    """
    from transformers import LlamaConfig

    if arch.family != "llama":
        raise LmpipeError(
            f"params.yaml: pretrain.model.family must be one of {list(FAMILIES)} for a causal LM "
            f"(got {arch.family!r}: an encoder family)"
        )
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_heads,
        max_position_embeddings=arch.max_length,
        attention_dropout=arch.dropout,
        tie_word_embeddings=True,  # the 8k x H embedding once, not twice (1M parameters at H = 128)
        bos_token_id=special["cls"],
        eos_token_id=special["sep"],
        pad_token_id=special["pad"],
    )


def build_clm(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised causal-LM model of `config`'s family; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad_id: int | None) -> torch.Tensor:
    """[batch, seq - 1] bool: which next-token targets `input_ids[:, 1:]` are scored.

    Every position after the first, except [PAD] targets and targets outside `attention_mask`.
    The loss and every reference use this one mask, so they score exactly the same tokens.
    """
    targets = input_ids[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)
    if pad_id is not None:
        keep &= targets != pad_id
    if attention_mask is not None:
        keep &= attention_mask[:, 1:].bool()
    return keep


def next_token_loss(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of every scored next token (see `target_mask`), the head on positions 0..T-2.

    All T-1 rows reach the head whatever the padding (ignored rows get label -100): a constant
    shape, which keeps oneDNN's per-shape kernel cache from growing on CPU (lmpipe.mlm.masking).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1])
    keep = target_mask(input_ids, attention_mask, model.config.pad_token_id)
    labels = input_ids[:, 1:].masked_fill(~keep, IGNORE)
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


class CausalLMObjective(torch.nn.Module):
    """forward(input_ids[, attention_mask]) -> mean next-token loss of `self.lm`."""

    def __init__(self, lm: PreTrainedModel) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return next_token_loss(self.lm, input_ids, attention_mask)


def objective_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The training loop's loss_fn: (mean next-token loss, input tokens processed)."""
    return model(**batch), batch["input_ids"].numel()


# --------------------------------------------------------------------------- references
def _as_index(values: Any) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True, eq=False)
class BigramReference:
    """A bigram model of the packed training tokens, smoothed toward the add-one unigram:

        p(n | p) = (c(p, n) + alpha * p_uni(n)) / (c(p) + alpha)

    (a Dirichlet prior of strength alpha centred on the unigram, MacKay & Peto 1995). A context
    seen often is trusted (c(p) >> alpha); a rare one leans on the unigram; an unseen one, such as
    [CLS], which never occurs inside the packed arrays, IS the unigram. Pairs are counted over
    the packed array as it is, across document boundaries too: the causal LM's training windows
    span them alike. Counts are stored sparsely: the sorted distinct pair ids p * V + n and their
    counts (a dense 8000^2 table would take 512 MB), looked up by binary search.
    """

    keys: np.ndarray
    """Sorted distinct pair ids prev * vocab_size + next (int64)."""
    counts: np.ndarray
    """c(prev, next) of each key (int64)."""
    prev_counts: np.ndarray
    """c(prev) = pairs starting with prev, [vocab_size] (int64)."""
    unigram: np.ndarray
    """p_uni, the add-one unigram probabilities, [vocab_size] (float64)."""
    vocab_size: int
    alpha: float
    """Prior strength: pseudo-counts of the unigram added to every context."""

    @classmethod
    def fit(
        cls, train_tokens: np.ndarray, vocab_size: int, alpha: float | None = None, grid: Iterable[float] = ALPHA_GRID
    ) -> "BigramReference":
        """Count the pairs of `train_tokens`; `alpha=None` chooses it from `grid` by leave-one-out.

        Leave-one-out (MacKay & Peto's criterion) scores each training pair by the model fitted
        on all pairs but itself, so alpha is tuned on the training data alone, never the held-out
        tokens it is compared on: alpha = argmax sum c(p,n) log((c(p,n) - 1 + alpha p_uni(n)) /
        (c(p) - 1 + alpha)). A tuned reference is the honest one: a weakly smoothed bigram
        (alpha = 1 gives an unseen pair after a 1,000-count context 1/1000 of its unigram
        probability) makes any LM look good.
        """
        tokens = np.asarray(train_tokens, dtype=np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= vocab_size):
            raise LmpipeError(f"bigram: token ids must lie in [0, {vocab_size}) (got {tokens.min()}..{tokens.max()})")
        keys, counts = np.unique(tokens[:-1] * vocab_size + tokens[1:], return_counts=True)
        prev_counts = np.bincount(tokens[:-1], minlength=vocab_size).astype(np.int64)
        unigram = unigram_log_probs(tokens, vocab_size).exp().numpy()
        if alpha is None:
            alpha = leave_one_out_alpha(keys, counts.astype(np.int64), prev_counts, unigram, grid)
        if alpha <= 0:
            raise LmpipeError(f"bigram: alpha must be > 0 (got {alpha})")
        return cls(keys, counts.astype(np.int64), prev_counts, unigram, vocab_size, float(alpha))

    def pair_counts(self, prev: Any, next_: Any) -> np.ndarray:
        """c(prev, next), vectorized (0 for a pair never seen)."""
        query = _as_index(prev) * self.vocab_size + _as_index(next_)
        if not len(self.keys):
            return np.zeros(query.shape, dtype=np.int64)
        at = np.searchsorted(self.keys, query).clip(max=len(self.keys) - 1)
        return np.where(self.keys[at] == query, self.counts[at], 0)

    def log_prob(self, prev: Any, next_: Any) -> np.ndarray | torch.Tensor:
        """log p(next | prev), elementwise over broadcastable arrays or tensors of ids (float64;
        a tensor when either input is one)."""
        p, n = _as_index(prev), _as_index(next_)
        prob = (self.pair_counts(p, n) + self.alpha * self.unigram[n]) / (self.prev_counts[p] + self.alpha)
        out = np.log(prob)
        return torch.from_numpy(out) if isinstance(prev, torch.Tensor) or isinstance(next_, torch.Tensor) else out


def leave_one_out_alpha(
    keys: np.ndarray, counts: np.ndarray, prev_counts: np.ndarray, unigram: np.ndarray, grid: Iterable[float]
) -> float:
    """The alpha of `grid` under which the training pairs are most likely, each left out in turn."""
    vocab_size = len(unigram)
    c = counts.astype(np.float64)
    base = unigram[keys % vocab_size]
    context = prev_counts[keys // vocab_size].astype(np.float64)

    def score(alpha: float) -> float:
        return float((c * np.log((c - 1.0 + alpha * base) / (context - 1.0 + alpha))).sum())

    return max(grid, key=score)


# --------------------------------------------------------------------------- evaluation
def evaluate_clm(
    model: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    unigram: torch.Tensor | None = None,
    bigram: BigramReference | None = None,
) -> dict[str, float]:
    """Held-out next-token metrics, pooled over every scored target of every batch (`target_mask`).

    val_loss / val_perplexity: mean cross-entropy per target and its exp. With `unigram`
    (unigram_log_probs) and `bigram` (BigramReference): their perplexities on exactly the same
    targets (the bigram sees the same previous token the model saw, [CLS] included) and the
    ratios perplexity_vs_unigram, perplexity_vs_bigram (< 1: the model beats the reference).
    """
    total, count, unigram_total, bigram_total = 0.0, 0, 0.0, 0.0
    pad_id = model.config.pad_token_id
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask.to(device)
        total += float(next_token_loss(model, ids, mask, reduction="sum"))
        keep = target_mask(ids, mask, pad_id).cpu()
        prev, targets = ids[:, :-1].cpu()[keep], ids[:, 1:].cpu()[keep]
        count += int(targets.numel())
        if unigram is not None:
            unigram_total -= float(unigram[targets].sum())
        if bigram is not None:
            bigram_total -= float(bigram.log_prob(prev, targets).sum())
    if count == 0:
        raise LmpipeError("evaluate_clm: the validation batches hold no target token")
    loss = total / count
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    if unigram is not None:
        out["unigram_perplexity"] = math.exp(unigram_total / count)
        out["perplexity_vs_unigram"] = out["val_perplexity"] / out["unigram_perplexity"]
    if bigram is not None:
        out["bigram_perplexity"] = math.exp(bigram_total / count)
        out["perplexity_vs_bigram"] = out["val_perplexity"] / out["bigram_perplexity"]
    return out


# --------------------------------------------------------------------------- cost, size, export
def parameter_counts(model: PreTrainedModel) -> dict[str, int]:
    """Trainable parameters: total (tied weights once), embedding (the token table, which is also
    the LM head) and the rest. Rotary tables are buffers, not parameters."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = model.get_input_embeddings().weight.numel()
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def save_clm(model: PreTrainedModel, tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    """Write an HF folder (config.json, model.safetensors; the tied head stored once) plus every
    tokenizer file beside it, `model_max_length` set to the model's context (as `save_mlm`).

    The tokenizer is the BERT-template one: `tokenizer(text)` wraps text in [CLS] ... [SEP];
    encode prompts with `add_special_tokens=False` after a [CLS] (lmpipe.clm.generation).
    """
    save_mlm(model, tokenizer_dir, out_dir)
