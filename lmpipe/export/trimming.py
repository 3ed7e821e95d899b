"""Trimming before quantization: drop the top encoder layers of the chosen model, measure the cost.

For each setting of `export.trim` (the shipped `drop_layers` and every `sweep` value, always
against 0), the fine-tuned folder is copied, its top k encoder layers are removed (the embedding,
the lower layers, the final norm, pooler and classifier stay as fine-tuned; no retraining), and
the trimmed model runs the parity texts through the same `Predictor` as the export: accuracy,
latency at batch 1 and 32, parameters and safetensors size. The export then ships
`drop_layers` (0 = untrimmed), refusing a trim that loses more than `max_accuracy_drop`.

Layers are found where transformers keeps them: `<base>.encoder.layer` (BERT, RoFormer) or
`<base>.layers` (ModernBERT, whose per-layer `layer_types` list is cut to match).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_json
from lmpipe.inference.classifier import INFO_FILE, encoder_layers, read_info

KEY = "export.trim.drop_layers"


def drop_top_layers(model: Any, k: int, where: str = KEY) -> Any:
    """Remove the top `k` encoder layers in place (config updated); returns the model."""
    import torch

    layers = encoder_layers(model, where)
    if not 0 <= k < len(layers):
        raise LmpipeError(f"{where}: {k} must be between 0 and {len(layers) - 1} (the model has {len(layers)} layers)")
    if k == 0:
        return model
    kept = len(layers) - k
    parent = model.base_model.encoder if hasattr(model.base_model, "encoder") else model.base_model
    attr = "layer" if hasattr(model.base_model, "encoder") else "layers"
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:kept]))
    config = model.config
    config.num_hidden_layers = kept
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:kept]
    return model


def trim_folder(hf: Path, k: int, where: str = KEY) -> None:
    """Rewrite the classifier folder `hf` with its top `k` layers dropped (k = 0: untouched);
    errors name `where`, the params key that asked for `k`."""
    if k == 0:
        return
    peft = read_info(hf).get("peft")
    if peft:
        raise LmpipeError(f"{where}: {hf} is a {peft.get('kind', 'peft')}-mode model; only plain models can be trimmed")
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(hf), local_files_only=True)
    drop_top_layers(model, k, where)
    model.config.name_or_path = ""
    model.save_pretrained(str(hf), safe_serialization=True)
    write_json(hf / INFO_FILE, {**read_info(hf), "trimmed_top_layers": k})


def settings(cfg: Any) -> list[int]:
    """Layer drops measured: 0, the shipped one and the sweep, ascending."""
    return sorted({0, cfg.drop_layers, *cfg.sweep})


def sweep(
    hf: Path, texts: Sequence[str], labels: np.ndarray, drops: Sequence[int], shipped: int, threads: int, latency: Any
) -> dict[str, dict[str, Any]]:
    """`drop<k>` -> layers, parameters, size, accuracy (and its drop from drop0), latency.

    `shipped` is `drop_layers`: an impossible drop is named as that key, any other as the sweep's."""
    from lmpipe.inference.predictor import Predictor

    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="lmpipe-trim-") as tmp:
        for k in drops:
            folder = Path(tmp) / f"drop{k}"
            shutil.copytree(hf, folder)
            trim_folder(folder, k, KEY if k == shipped else "export.trim.sweep")
            predictor = Predictor(folder, "torch", threads)
            accuracy = float((predictor.logits(texts, batch_size=32).argmax(axis=1) == labels).mean())
            rows[f"drop{k}"] = {
                "drop_layers": k,
                "layers": int(predictor.model.config.num_hidden_layers),
                "params_m": round(sum(p.numel() for p in predictor.model.parameters()) / 1e6, 4),
                "size_mb": round((folder / "model.safetensors").stat().st_size / 1e6, 3),
                "accuracy": accuracy,
                "accuracy_drop": round(rows["drop0"]["accuracy"] - accuracy, 9) if rows else 0.0,
                "latency_ms": latency(predictor, texts),
            }
    return rows
