"""The masked-LM encoder we pretrain: config, objective, held-out perplexity, HF export.

- `mlm_config` builds a `BertConfig` from `params.pretrain.model` and the tokenizer's vocabulary
  and special ids (never hard-coded).
- `masked_lm_loss` runs the encoder on every position but the MLM head (transform + the
  vocabulary projection, ~40% of the FLOPs of a small BERT with an 8k vocabulary) only on the
  masked rows: hidden states where labels != -100 are gathered first. It equals the loss of
  `BertForMaskedLM(labels=...)`, which projects every position (tests/unit/test_models.py).
- `MaskedLMObjective` wraps a `BertForMaskedLM` so the training loop (and DDP) can call one
  forward that returns that loss.
- `save_mlm` writes a folder `AutoModelForMaskedLM.from_pretrained` loads (safetensors) with the
  tokenizer files beside it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from transformers import BertConfig, BertForMaskedLM

from lmpipe.masking import IGNORE


def mlm_config(arch: Any, vocab_size: int, pad_id: int) -> BertConfig:
    """BertConfig from a params Architecture (num_layers, hidden_size, num_heads,
    intermediate_size, max_length, dropout) and the tokenizer's vocabulary size and [PAD] id."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        intermediate_size=arch.intermediate_size,
        max_position_embeddings=arch.max_length,
        hidden_dropout_prob=arch.dropout,
        attention_probs_dropout_prob=arch.dropout,
        pad_token_id=pad_id,
        type_vocab_size=2,
    )


def build_mlm(config: BertConfig, seed: int) -> BertForMaskedLM:
    """A freshly initialised BertForMaskedLM; the same seed gives the same weights."""
    torch.manual_seed(seed)
    return BertForMaskedLM(config)


def masked_lm_loss(
    model: BertForMaskedLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy over the masked positions only, the head applied to those rows only."""
    hidden = model.bert(input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
    selected = labels != IGNORE
    logits = model.cls(hidden[selected])
    return F.cross_entropy(logits.float(), labels[selected], reduction=reduction)


class MaskedLMObjective(torch.nn.Module):
    """forward(input_ids, labels[, attention_mask]) -> mean masked-LM loss of `self.mlm`."""

    def __init__(self, mlm: BertForMaskedLM) -> None:
        super().__init__()
        self.mlm = mlm

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return masked_lm_loss(self.mlm, input_ids, labels, attention_mask)


def objective_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The training loop's loss_fn: (mean masked-LM loss, input tokens processed)."""
    return model(**batch), batch["input_ids"].numel()


def evaluate_mlm(
    mlm: BertForMaskedLM, batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> dict[str, float]:
    """Held-out loss (mean cross-entropy per masked token, pooled over all batches) and perplexity."""
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        total += float(masked_lm_loss(mlm, reduction="sum", **batch))
        count += int((batch["labels"] != IGNORE).sum())
    loss = total / count
    return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}


def parameter_counts(mlm: BertForMaskedLM) -> dict[str, int]:
    """total (tied weights once), embedding (token, position, type) and non-embedding counts."""
    total = sum(p.numel() for p in mlm.parameters())
    emb = mlm.bert.embeddings
    embedding = sum(
        m.weight.numel() for m in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings)
    )
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def save_mlm(mlm: BertForMaskedLM, tokenizer_dir: str | Path, out_dir: str | Path) -> None:
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
