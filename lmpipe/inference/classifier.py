"""The fine-tuned classifier folder: a plain HF folder plus `lmpipe.json` saying how to encode text.

Written by the finetune stage (`save_classifier`), read by evaluate, export, predict and studies
(`load_classifier`, the one loader, and `read_info`). A prefix-tuned or adapter model (weights that
cannot be merged into the HF ones) also holds `peft.safetensors`, described by the `peft` entry of
`lmpipe.json`; `load_classifier` rebuilds it (lmpipe.inference.peft_modules), so never load such a
folder with `AutoModelForSequenceClassification` alone. Bytes are stable: safetensors and JSON keys sorted, no paths or
times inside. transformers is imported on use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import write_json
from lmpipe.inference import peft_modules

INFO_FILE = "lmpipe.json"


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()  # the load report is logged by us instead
    transformers.utils.logging.disable_progress_bar()


def save_classifier(model: Any, tokenizer: Any, out_dir: str | Path, info: dict[str, Any]) -> None:
    """Write a plain HF folder (safetensors, config, tokenizer) and `lmpipe.json` = info.

    The caller passes a merged (plain) model, or a prefix / adapter wrapper
    (lmpipe.inference.peft_modules) whose extra weights go to `peft.safetensors` and whose
    description goes to info["peft"]; it writes into a temporary folder (atomic_dir).
    Bytes are stable: safetensors and json keys are sorted, no paths or times are written.
    """

    quiet_transformers()
    out_dir = Path(out_dir)
    if peft_modules.is_wrapped(model):
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        extra = {k: v.detach().contiguous() for k, v in sorted(model.extra.state_dict().items())}
        save_file(extra, str(out_dir / peft_modules.PEFT_FILE))
        info = {**info, "peft": model.describe()}
        model = model.model
    model.config.name_or_path = ""  # never an absolute path in the saved config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.model_max_length = int(info["max_length"])  # pipeline(..., truncation=True) cuts here
    tokenizer.name_or_path = ""
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / INFO_FILE, info)
    mask = os.umask(0)
    os.umask(mask)
    for path in out_dir.iterdir():  # some writers use 0600 temp files; give what open() gives
        path.chmod(0o666 & ~mask)


def load_classifier(model_dir: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, lmpipe.json) of a folder written by save_classifier."""
    from transformers import AutoTokenizer

    info = read_info(model_dir)
    model = load_model(model_dir, info)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return model, tokenizer, info


def load_model(model_dir: str | Path, info: dict[str, Any] | None = None) -> Any:
    """The one loader of a fine-tuned classifier (eval mode): the plain HF model, or the prefix /
    adapter wrapper rebuilt from `peft.safetensors` when lmpipe.json has a `peft` entry."""
    from transformers import AutoModelForSequenceClassification

    info = read_info(model_dir) if info is None else info
    quiet_transformers()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    if "peft" in info:
        from safetensors.torch import load_file

        extra = Path(model_dir) / peft_modules.PEFT_FILE
        if not extra.is_file():
            raise LmpipeError(f"{extra}: file not found (lmpipe.json has a peft entry)")
        model = peft_modules.rebuild(model, info["peft"], load_file(str(extra)), str(Path(model_dir) / INFO_FILE))
    return model.eval()


def encoder_layers(model: Any, where: str) -> Any:
    """The ModuleList of encoder layers of an HF classifier: `encoder.layer` (BERT, RoFormer,
    MiniLM) or `layers` (ModernBERT); an error names `where` (the params key that needs them)."""
    base = model.base_model
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None) if encoder is not None else getattr(base, "layers", None)
    if layers is None:
        raise LmpipeError(
            f"{where}: {type(model).__name__} has no encoder.layer or layers list (not a BERT-family model)"
        )
    return layers


def read_info(model_dir: str | Path) -> dict[str, Any]:
    """`lmpipe.json` of a classifier folder; it must say how to encode text (max_length, truncation)."""
    path = Path(model_dir) / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LmpipeError(f"{path}: file not found (not a model written by the finetune stage)") from None
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    for key in ("max_length", "truncation"):
        if not isinstance(info, dict) or key not in info:
            raise LmpipeError(f"{path}: missing key {key!r}")
    return info


def load_tokenizer(backbone_dir: str | Path) -> Any:
    """The backbone's own (fast) tokenizer, offline; a folder without one is an error naming it."""
    from transformers import AutoTokenizer

    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone_dir, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise LmpipeError(f"{backbone_dir}: no loadable tokenizer ({str(exc).splitlines()[0]})") from None
    if tokenizer.pad_token_id is None:
        raise LmpipeError(f"{backbone_dir}: the tokenizer has no [PAD] token")
    return tokenizer
