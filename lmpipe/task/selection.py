"""Which fine-tuned model to ship: the best by a validation metric, the same rule everywhere.

Used by export (the model it exports) and evaluate (the model its headline numbers describe), so
both always name the same model; test figures never take part in the choice. `best` skips a model
whose metrics.json records a mode export cannot ship (lmpipe.core.params.NOT_EXPORTABLE: prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import read_json
from lmpipe.core.params import NOT_EXPORTABLE


def select_model(
    choice: str, metric: str, backbones: Sequence[str], reports_dir: str | Path
) -> tuple[str, dict[str, float]]:
    """(chosen backbone, {candidate: validation metric}) per export.model / selection_metric."""
    candidates = sorted(backbones) if choice == "best" else [choice]
    scores: dict[str, float] = {}
    for name in list(candidates):
        path = Path(reports_dir) / name / "metrics.json"
        if not path.is_file():
            raise LmpipeError(f"{path}: file not found (run `dvc repro finetune@{name}` first)")
        report = read_json(path)
        if report.get("mode") in NOT_EXPORTABLE:
            if choice != "best":
                mode = report["mode"]
                raise LmpipeError(f"export.model: {name!r} is fine-tuned in {mode} mode, which export refuses")
            candidates.remove(name)
            continue
        value = report.get(metric)
        if not isinstance(value, (int, float)) or not np.isfinite(value):
            raise LmpipeError(f"{path}: {metric!r} is missing or not a finite number (got {value!r})")
        scores[name] = float(value)
    if not candidates:
        raise LmpipeError(f"export.model: best finds no model export can ship among {sorted(backbones)}")
    sign = 1.0 if metric == "val_loss" else -1.0  # lower loss is better; higher accuracy/F1 is
    best = min(candidates, key=lambda n: (sign * scores[n], n))
    return best, scores
