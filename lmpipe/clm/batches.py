"""Causal-LM batches: fixed-length windows of the packed token arrays, [CLS] first, no [SEP].

- Windows: [CLS] + `window` = max_length - 1 consecutive tokens of `train.bin` (documents are
  packed back to back, so a window may span a document boundary, as the masked-LM windows do).
  No [SEP] closes a window: the model predicts each next token, and a [SEP] at a fixed
  position would be a free target. No padding is ever needed; [CLS] is the beginning-of-sequence
  token that the first real token is predicted from.
- Training windows: the starts for optimizer step `step` are drawn exactly as the masked-LM
  ones (`lmpipe.mlm.masking.MLMBatches.train_starts`, shared below): a batch is a pure function
  of (seed, step, micro, rank, world), so a resumed run, and 1 process x 2 accumulation steps
  against 2 processes x 1, see the same data. There is no masking, hence no per-step generator.
- Validation windows: `eval_batches x batch_size` windows evenly spaced over `val.bin`
  (`MLMBatches._val_starts`): the same held-out targets at every evaluation.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmpipe.core.errors import LmpipeError
from lmpipe.mlm.masking import MLMBatches
from lmpipe.tokenize.tokenization import load_token_split


def causal_windows(tokens: np.ndarray, starts: Sequence[int], window: int, cls_id: int) -> torch.Tensor:
    """[len(starts), window + 1] int64: [CLS] followed by tokens[s : s + window]."""
    out = np.empty((len(starts), window + 1), dtype=np.int64)
    out[:, 0] = cls_id
    for row, start in enumerate(starts):
        out[row, 1:] = tokens[start : start + window]
    return torch.from_numpy(out)


class CLMBatches:
    """Training and validation batches of one packed token split pair (see the module docstring)."""

    # The window draws of the masked-LM batches, shared so both objectives sample alike. They read
    # train_tokens / val_tokens, window, batch_size, grad_accum, eval_batches and seed.
    train_starts = MLMBatches.train_starts
    _val_starts = MLMBatches._val_starts

    def __init__(
        self,
        train_tokens: np.ndarray,
        val_tokens: np.ndarray,
        *,
        max_length: int,
        batch_size: int,
        grad_accum: int,
        eval_batches: int,
        seed: int,
        cls_id: int,
    ) -> None:
        self.window = max_length - 1
        for name, arr in (("train", train_tokens), ("val", val_tokens)):
            if len(arr) < self.window:
                raise LmpipeError(
                    f"data/tokens/{name}.bin: holds {len(arr)} tokens, fewer than one window of "
                    f"{self.window} (pretrain.model.max_length - 1)"
                )
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.batch_size, self.grad_accum, self.eval_batches = batch_size, grad_accum, eval_batches
        self.seed, self.cls_id = seed, cls_id

    @classmethod
    def from_tokens_dir(cls, tokens_dir: str | Path, pretrain: Any, seed: int) -> tuple["CLMBatches", dict]:
        """Batches over `<tokens_dir>/{train,val}.bin` shaped by a `params.pretrain` section;
        returns (batches, meta.json) with [CLS]'s id read from meta.json."""
        train_tokens, _ = load_token_split(tokens_dir, "train")
        val_tokens, _ = load_token_split(tokens_dir, "val")
        meta = json.loads((Path(tokens_dir) / "meta.json").read_text(encoding="utf-8"))
        batches = cls(
            train_tokens,
            val_tokens,
            max_length=pretrain.model.max_length,
            batch_size=pretrain.loop.batch_size,
            grad_accum=pretrain.loop.grad_accum,
            eval_batches=pretrain.eval_batches,
            seed=seed,
            cls_id=meta["special_tokens"]["cls"],
        )
        return batches, meta

    def batch_at(self, step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        """The micro-batch `micro` of rank `rank` at optimizer step `step` (pure function)."""
        shard = micro * world + rank
        starts = self.train_starts(step, world)[shard * self.batch_size : (shard + 1) * self.batch_size]
        return {"input_ids": causal_windows(self.train_tokens, starts, self.window, self.cls_id)}

    def val_batches(self) -> list[dict[str, torch.Tensor]]:
        """The fixed held-out batches: `eval_batches` batches of evenly spaced windows."""
        starts = self._val_starts()
        return [
            {
                "input_ids": causal_windows(
                    self.val_tokens, starts[i * self.batch_size : (i + 1) * self.batch_size], self.window, self.cls_id
                )
            }
            for i in range(self.eval_batches)
        ]
