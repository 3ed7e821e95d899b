"""The one batched inference loop: encoded texts to logits, batches sorted by length.

Used by fine-tuning's validation, the evaluate stage, the export parity check and `lmpipe
predict` (through `Predictor`), so evaluate scores exactly the code that serves. A backend is a
`forward(arrays) -> logits` function over int64 numpy arrays, so torch and ONNX Runtime share
the batching, the padding and the order of the output rows.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from lmpipe.inference.encoding import pad_batch

Forward = Callable[[dict[str, np.ndarray]], Any]
TORCH_INPUTS = ("input_ids", "attention_mask")


def length_order(input_ids: Sequence[Sequence[int]], longest_first: bool = False) -> np.ndarray:
    """Row order that groups similar lengths (stable: equal lengths keep their input order).

    Shortest first by default; `longest_first` meets the peak memory on the first batch.
    """
    lengths = np.asarray([len(x) for x in input_ids])
    return np.argsort(-lengths if longest_first else lengths, kind="stable")


def iter_batches(
    input_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    *,
    input_names: Sequence[str] = TORCH_INPUTS,
    longest_first: bool = False,
) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(row positions, padded `input_names` arrays) per batch, in `length_order`."""
    order = length_order(input_ids, longest_first)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        arrays = pad_batch([input_ids[i] for i in rows], pad_id)
        yield rows, {name: arrays[name] for name in input_names}


def batched_logits(
    forward: Forward,
    input_ids: Sequence[Sequence[int]],
    pad_id: int,
    n_outputs: int,
    batch_size: int,
    *,
    input_names: Sequence[str] = TORCH_INPUTS,
    longest_first: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """float64 logits `[n, n_outputs]` in input order; `forward` sees `input_names` arrays per batch."""
    out = np.zeros((len(input_ids), n_outputs), dtype=np.float64)
    batches = iter_batches(input_ids, pad_id, batch_size, input_names=input_names, longest_first=longest_first)
    if desc:
        from tqdm import tqdm

        total = -(-len(input_ids) // batch_size)
        batches = tqdm(batches, desc=desc, total=total, unit="batch", disable=not sys.stderr.isatty(), leave=False)
    for rows, arrays in batches:
        out[rows] = forward(arrays)
    return out


def torch_forward(model: Any, device: Any = None) -> Forward:
    """`forward(arrays) -> float32 numpy logits` of a transformers classifier, without gradients."""
    import torch

    if device is None:
        device = next(model.parameters()).device

    def forward(arrays: dict[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            tensors = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
            return model(**tensors).logits.float().cpu().numpy()

    return forward


def torch_logits(
    model: Any,
    input_ids: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int,
    *,
    longest_first: bool = False,
    desc: str | None = None,
) -> np.ndarray:
    """`batched_logits` of a torch classifier in eval mode (its train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        return batched_logits(
            torch_forward(model),
            input_ids,
            pad_id,
            model.config.num_labels,
            batch_size,
            longest_first=longest_first,
            desc=desc,
        )
    finally:
        model.train(was_training)
