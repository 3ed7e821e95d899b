"""The one text encoding: texts to [CLS] ... [SEP] token ids, cut head or head+tail, padded per batch.

The fast tokenizer encodes a whole batch once without special tokens or truncation, then each
example is cut to its budget (`head` or `head_tail`) and wrapped in [CLS] ... [SEP]. No padding
at encoding time: batches pad to their own longest example (`pad_batch`, `collate`). Shared by
fine-tuning, evaluation, the export parity check and `lmpipe predict`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmpipe.core.errors import LmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch


def head_tail_split(max_length: int) -> tuple[int, int]:
    """Tokens kept from the start and from the end under `head_tail`.

    A quarter of max_length comes from the head, the rest of the budget (max_length - 2 for
    [CLS] and [SEP]) from the tail: 128 + 382 at 512, as in Sun et al. (2019), "How to
    Fine-Tune BERT for Text Classification?"; 32 + 94 at 128. Reviews state their verdict at
    the end more often than at the start, hence the larger tail.
    """
    budget = max_length - 2
    head = max_length // 4
    return head, budget - head


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int, truncation: str) -> dict[str, list[list[int]]]:
    """Token ids and attention masks, unpadded, [CLS] and [SEP] from the tokenizer.

    `head`: the first max_length - 2 tokens; `head_tail`: see `head_tail_split`. Texts that fit
    are kept whole. The one encoding shared by finetune, evaluate, export, predict and serve
    (which keeps the uncut ids of `tokenize_texts` for its drift statistics, then `cut_and_wrap`s them).
    """
    ids = cut_and_wrap(tokenizer, tokenize_texts(tokenizer, texts), max_length, truncation)
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids]}


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of whole texts: no special tokens, no truncation (one fast-tokenizer batch call)."""
    return tokenizer(
        list(texts),
        add_special_tokens=False,
        truncation=False,
        padding=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]


def cut_and_wrap(tokenizer: Any, raw: Sequence[Sequence[int]], max_length: int, truncation: str) -> list[list[int]]:
    """`tokenize_texts` ids cut to max_length (`head` or `head_tail`) and wrapped in [CLS] ... [SEP]."""
    if truncation not in ("head", "head_tail"):
        raise LmpipeError(f"truncation must be one of ['head', 'head_tail'] (got {truncation!r})")
    if max_length < 3:
        raise LmpipeError(f"max_length must be >= 3 to hold [CLS], a token and [SEP] (got {max_length})")
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    if cls_id is None or sep_id is None:
        raise LmpipeError(f"tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] token")
    budget = max_length - 2
    head, tail = head_tail_split(max_length) if truncation == "head_tail" else (budget, 0)
    ids = []
    for seq in raw:
        seq = list(seq)
        if len(seq) > budget:
            seq = seq[:head] + (seq[len(seq) - tail :] if tail else [])
        ids.append([cls_id, *seq, sep_id])
    return ids


def pad_batch(input_ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, np.ndarray]:
    """int64 `input_ids` padded to the longest example, its `attention_mask` and zero `token_type_ids`."""
    width = max(len(x) for x in input_ids)
    ids = np.full((len(input_ids), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(input_ids), width), dtype=np.int64)
    for row, seq in enumerate(input_ids):
        ids[row, : len(seq)] = seq
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(mask)}


def collate(input_ids: Sequence[Sequence[int]], labels: Sequence[int] | None, pad_id: int) -> dict[str, "torch.Tensor"]:
    """Pad a batch to its longest example: input_ids, attention_mask (and labels)."""
    import torch

    arrays = pad_batch(input_ids, pad_id)
    batch = {name: torch.from_numpy(arrays[name]) for name in ("input_ids", "attention_mask")}
    if labels is not None:
        batch["labels"] = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return batch
