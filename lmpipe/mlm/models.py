"""The masked-LM encoder we pretrain: config, objective, held-out perplexity, HF export.

- `mlm_config` builds the transformers config of `params.pretrain.model.family` from
  `params.pretrain.model` and the tokenizer's vocabulary and special ids (never hard-coded):
  `bert` (learned absolute positions, post-LN), `roformer` (rotary positions, post-LN) or
  `modernbert` (rotary, pre-LN, GeGLU, no biases). Each is a stock transformers class, so the
  saved folder loads with the Auto classes offline, with no remote code.
- `masked_lm_loss` runs the encoder on every position but the MLM head (transform + the
  vocabulary projection, ~40% of the FLOPs of a small BERT with an 8k vocabulary) only on the
  masked rows: hidden states where labels != -100 are gathered first. It equals the loss of
  `<Family>ForMaskedLM(labels=...)`, which projects every position (tests/unit/test_models.py).
- `MaskedLMObjective` wraps a masked-LM model so the training loop (and DDP) can call one
  forward that returns that loss.
- `save_mlm` writes a folder `AutoModelForMaskedLM.from_pretrained` loads (safetensors) with the
  tokenizer files beside it.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from lmpipe.core.errors import LmpipeError
from lmpipe.mlm.masking import IGNORE

log = logging.getLogger("lmpipe.mlm.models")

FAMILIES = ("bert", "roformer", "modernbert")


def mlm_config(arch: Any, vocab_size: int, special: dict[str, int]) -> PretrainedConfig:
    """The config of `arch.family` from a params Architecture (num_layers, hidden_size,
    num_heads, intermediate_size, max_length, dropout) and the tokenizer's vocabulary size and
    special ids (`pad`, `cls`, `sep` keys, as in data/tokens/meta.json)."""
    from transformers import BertConfig, ModernBertConfig, RoFormerConfig

    family = arch.family
    shape = dict(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_length,
        pad_token_id=special["pad"],
    )
    if family == "bert":
        return BertConfig(
            **shape, hidden_dropout_prob=arch.dropout, attention_probs_dropout_prob=arch.dropout, type_vocab_size=2
        )
    if family == "roformer":
        return RoFormerConfig(
            **shape,
            embedding_size=arch.hidden_size,
            hidden_dropout_prob=arch.dropout,
            attention_probs_dropout_prob=arch.dropout,
            type_vocab_size=2,
        )
    if family == "modernbert":
        # every layer attends globally: our windows (<= 512 tokens) gain nothing from local attention
        return ModernBertConfig(
            **shape,
            cls_token_id=special["cls"],
            sep_token_id=special["sep"],
            bos_token_id=special["cls"],
            eos_token_id=special["sep"],
            layer_types=["full_attention"] * arch.num_layers,
            embedding_dropout=arch.dropout,
            attention_dropout=arch.dropout,
            mlp_dropout=arch.dropout,
            classifier_pooling="mean",
        )
    raise LmpipeError(f"params.yaml: pretrain.model.family must be one of {list(FAMILIES)} (got {family!r})")


def build_mlm(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A freshly initialised masked-LM model of `config`'s family; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return AutoModelForMaskedLM.from_config(config)


def mlm_head(model: PreTrainedModel) -> torch.nn.Module | Any:
    """The masked-LM head of `model`: hidden states [n, H] -> vocabulary logits [n, V].

    BERT and RoFormer keep it in `.cls` (transform + decoder); ModernBERT splits it into
    `.head` (transform) and `.decoder` (the tied vocabulary projection).
    """
    if hasattr(model, "cls"):
        return model.cls
    if hasattr(model, "head") and hasattr(model, "decoder"):
        return lambda hidden: model.decoder(model.head(hidden))
    raise LmpipeError(f"{type(model).__name__}: no masked-LM head (.cls or .head + .decoder)")


def masked_lm_loss(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the masked positions only, the head applied to those rows only."""
    hidden = model.base_model(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    selected = labels != IGNORE
    logits = mlm_head(model)(hidden[selected])
    return F.cross_entropy(logits.float(), labels[selected], reduction=reduction)


class MaskedLMObjective(torch.nn.Module):
    """forward(input_ids, labels[, attention_mask]) -> mean masked-LM loss of `self.mlm`."""

    def __init__(self, mlm: PreTrainedModel) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return masked_lm_loss(self.mlm, input_ids, labels, attention_mask)


def objective_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The training loop's loss_fn: (mean masked-LM loss, input tokens processed)."""
    return model(**batch), batch["input_ids"].numel()


def unigram_log_probs(train_tokens: np.ndarray, vocab_size: int) -> torch.Tensor:
    """log p(token) of an add-one smoothed unigram model of the training tokens, [vocab_size].

    The reference a masked-LM must beat to have learned anything from context: it predicts
    every masked token from its training frequency alone. Add-one (Laplace) smoothing keeps a
    token never seen in training at a finite cost: p = (count + 1) / (N + V).
    """
    counts = np.bincount(np.asarray(train_tokens, dtype=np.int64), minlength=vocab_size)[:vocab_size]
    counts = counts.astype(np.float64) + 1.0
    return torch.from_numpy(np.log(counts / counts.sum()))


def pooled_spread(mlm: PreTrainedModel, input_ids: torch.Tensor) -> float:
    """How much the mean-pooled encoder vectors of different inputs differ: ||X - mean(X)|| / ||X||.

    X holds one mean-pooled last hidden state per row of `input_ids` (unmasked text). 0 means
    every input maps to the same vector (a collapsed encoder: a classifier on top sees one
    point); a healthy encoder keeps a clear share of the norm in what differs between inputs.
    """
    hidden = mlm.base_model(input_ids, return_dict=True).last_hidden_state.float()
    pooled = hidden.mean(dim=1)
    return float((pooled - pooled.mean(dim=0)).norm() / pooled.norm().clamp_min(1e-12))


def evaluate_mlm(
    mlm: PreTrainedModel,
    batches: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    unigram: torch.Tensor | None = None,
    spread_ids: torch.Tensor | None = None,
) -> dict[str, float]:
    """Held-out masked-LM metrics, pooled over all masked tokens of all batches.

    val_loss / val_perplexity: mean cross-entropy per masked token and its exp. The caller
    masks every evaluated target with [MASK] (see MLMBatches.val_batches): with BERT's 10%
    kept tokens the answer would sit in the input and a model that copies would look good.
    With `unigram` (unigram_log_probs): unigram_perplexity on exactly the same targets and
    perplexity_vs_unigram (< 1: the model uses context). With `spread_ids`: pooled_spread.
    """
    total, count, unigram_total = 0.0, 0, 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(masked_lm_loss(mlm, reduction="sum", **batch))
        targets = batch["labels"][batch["labels"] != IGNORE]
        count += int(targets.numel())
        if unigram is not None:
            unigram_total -= float(unigram[targets.cpu()].sum())
    loss = total / count
    out = {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}
    if unigram is not None:
        out["unigram_perplexity"] = math.exp(unigram_total / count)
        out["perplexity_vs_unigram"] = out["val_perplexity"] / out["unigram_perplexity"]
    if spread_ids is not None:
        out["pooled_spread"] = pooled_spread(mlm, spread_ids.to(device))
    return out


def collapsed(metrics: dict[str, float], threshold: float) -> bool:
    """True (and a warning logged) when the final `pooled_spread` is below `threshold`."""
    spread = metrics.get("pooled_spread")
    if spread is None or spread >= threshold:
        return False
    log.warning(
        "pretrain: the encoder has collapsed: pooled_spread %.4f < pretrain.collapse_spread %g "
        "(every input maps to nearly the same vector; fine-tuning starts near chance)",
        spread,
        threshold,
    )
    return True


def parameter_counts(mlm: PreTrainedModel) -> dict[str, int]:
    """Trainable parameters: total (tied weights once), embedding (the base model's embedding
    module: tokens, and learned positions and types where the family has them) and the rest.
    Fixed sinusoidal tables (RoFormer's) are not trained and not counted."""
    total = sum(p.numel() for p in mlm.parameters() if p.requires_grad)
    embedding = sum(p.numel() for p in mlm.base_model.embeddings.parameters() if p.requires_grad)
    embedding -= sum(
        p.numel() for n, p in mlm.base_model.embeddings.named_parameters() if p.requires_grad and p.ndim < 2
    )  # embedding norms are not lookup tables
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def save_mlm(mlm: PreTrainedModel, tokenizer_dir: str | Path, out_dir: str | Path) -> None:
    """Write an HF folder (config.json, model.safetensors) plus every tokenizer file beside it.

    The copied tokenizer_config.json gets `model_max_length` = the model's position count, so a
    tokenizer loaded from the folder never produces a sequence the model cannot embed.
    """
    from transformers.utils import logging as hf_logging

    out_dir = Path(out_dir)
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar in stage logs
    mlm.save_pretrained(out_dir)  # safetensors is the transformers 5 format
    for item in sorted(Path(tokenizer_dir).iterdir()):
        if item.is_file() and not (out_dir / item.name).exists():
            shutil.copyfile(item, out_dir / item.name)
    tok_config = out_dir / "tokenizer_config.json"
    if tok_config.is_file():
        data = json.loads(tok_config.read_text(encoding="utf-8"))
        data["model_max_length"] = mlm.config.max_position_embeddings
        tok_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
