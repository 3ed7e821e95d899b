"""What the evaluate stage asks of a pretrained causal LM (`pretrain.objective: clm`).

- `clm_perplexity`: next-token perplexity on the test text, in windows of the model's context
  ([CLS] + tokens), every token after the first scored (lmpipe.clm.models.evaluate_clm).
- `prompted_probs`: classification without training, by prompting: for each test text the
  template (`evaluate.prompting.template`) is followed by each label word and the word's summed
  log-probability is its score (lmpipe.clm.prompting); zero-shot from the template alone, few-shot
  with `evaluate.prompting.shots` labelled train examples (seeded, balanced) before every text. The
  label scores, softmaxed over the labels, become probabilities scored like any model's: with a
  bootstrap CI and McNemar's test against the baseline.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.task import metrics as M

ZERO_SHOT, FEW_SHOT = "clm_zero_shot", "clm_few_shot"  # their rows in metrics.json and comparison.md


def is_causal_lm(path: str | Path) -> bool:
    """Whether the HF folder at `path` holds a causal LM (its config's architectures)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    names = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
    return any(name.endswith("ForCausalLM") for name in names)


def load(path: str | Path, device: Any) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval().to(device)
    return model, tokenizer


def clm_perplexity(
    model: Any, tokenizer: Any, texts: Sequence[str], *, batch_size: int, device: Any, max_windows: int | None
) -> dict[str, float]:
    """Next-token perplexity of the test text: consecutive windows of [CLS] + context - 1 tokens."""
    import torch

    from lmpipe.clm.models import evaluate_clm

    width = int(model.config.max_position_embeddings) - 1
    stream = [t for ids in tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"] for t in ids]
    starts = list(range(0, max(0, len(stream) - width + 1), width))[:max_windows]
    if not starts:
        raise LmpipeError("the test split holds fewer tokens than one window of the causal LM")
    rows = [[tokenizer.cls_token_id, *stream[s : s + width]] for s in starts]
    batches = [{"input_ids": torch.tensor(rows[i : i + batch_size])} for i in range(0, len(rows), batch_size)]
    with torch.inference_mode():
        scored = evaluate_clm(model, batches, device)
    return {
        "test_clm_perplexity": scored["val_perplexity"],
        "test_clm_nll": scored["val_loss"],
        "test_clm_tokens": len(rows) * width,
        "test_clm_windows": len(rows),
    }


def prompted_probs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    label_names: Sequence[str],
    settings: Any,
    seed: int,
    pool: Callable[[], tuple[Sequence[str], np.ndarray]] | None,
) -> dict[str, np.ndarray]:
    """{row name: [n, n_labels] probabilities} of zero-shot and (with a pool and shots > 0) few-shot prompting."""
    import torch

    from lmpipe.clm.prompting import draw_shots, label_log_probs

    cfg = settings.prompting
    words = list(cfg.label_words) if cfg.label_words else [f" {name}" for name in label_names]
    if len(words) != len(label_names):
        raise LmpipeError(f"evaluate.prompting.label_words: {len(words)} words for {len(label_names)} labels")
    for word in words:  # an unknown word scores as [UNK]: every label alike, a silent coin toss
        if tokenizer.unk_token_id in tokenizer(word, add_special_tokens=False)["input_ids"]:
            raise LmpipeError(f"evaluate.prompting.label_words: {word!r} is not in the tokenizer's vocabulary")
    kwargs = {"label_words": words, "template": cfg.template, "batch_size": settings.batch_size}
    with torch.inference_mode():
        found = {ZERO_SHOT: M.softmax(label_log_probs(model, tokenizer, texts, **kwargs))}
        if cfg.shots and pool is not None:
            pool_texts, pool_labels = pool()
            shots = [(pool_texts[i], int(pool_labels[i])) for i in draw_shots(pool_labels, cfg.shots, len(words), seed)]
            found[FEW_SHOT] = M.softmax(label_log_probs(model, tokenizer, texts, shots=shots, **kwargs))
    return found
