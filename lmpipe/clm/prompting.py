"""Sentiment classification by prompting a causal LM: zero-shot and few-shot, no training.

A prompt is [CLS], then the few-shot examples (each the template filled with its text, then its
answer, then a blank line), then the template filled with the review and no answer. Each label
word is scored as the continuation of the prompt: the summed log-probability of its tokens
(a label word of several tokens sums them all, so a long word is not favoured by scoring its
first piece only). The prediction is the label with the highest score.

Tokens, not strings, are concatenated: the prompt parts (template head, text, template tail,
answer) are tokenized separately and joined, which is what the string would tokenize to when
each part starts and ends at whitespace or punctuation (true of the default template with this
project's WordPiece or BPE tokenizers, whose pre-tokenizers split there). It lets texts be cut
without re-tokenizing.

Length: the model reads at most `max_length` tokens (its context). The prompt plus the longest
label must fit: each text is cut to its budget keeping its first quarter and the rest from its
end (the project's `head_tail` ratio, lmpipe.inference.encoding: reviews give their verdict at
the end more often than at the start). The few-shot examples share the context evenly with the
review; the review then takes whatever the examples left.

Batching: all (text, label) sequences are scored in batches of `batch_size`, right-padded with
[PAD] and an attention mask. Right padding is exact for a causal LM without position ids:
every real token sits at its unpadded position and never attends to the padding after it (a test
holds batched scores equal to one-at-a-time scores).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lmpipe.core.errors import LmpipeError
from lmpipe.inference.encoding import pad_batch, tokenize_texts

TEMPLATE = "Review: {text}\nSentiment:"
"""The default prompt template: `{text}` is the review; the label word follows the colon."""
LABEL_WORDS = (" negative", " positive")
"""Label words of label ids 0 and 1 (the leading space: a new word, as after "Sentiment:")."""
SHOT_SEPARATOR = "\n\n"
"""Between few-shot examples (the BERT normalizer reads it as whitespace)."""


def head_tail(ids: Sequence[int], budget: int) -> list[int]:
    """`ids` cut to `budget` tokens: the first quarter of the budget and the rest from the end."""
    ids = list(ids)
    if len(ids) <= budget:
        return ids
    head = budget // 4
    tail = budget - head
    return ids[:head] + (ids[len(ids) - tail :] if tail else [])


class PromptBuilder:
    """Token-level prompts of one template, label set and example list for one tokenizer."""

    def __init__(
        self,
        tokenizer: Any,
        label_words: Sequence[str],
        template: str,
        shots: Sequence[tuple[str, int]],
        max_length: int,
    ) -> None:
        if template.count("{text}") != 1:
            raise LmpipeError(f"prompting: the template must hold '{{text}}' exactly once (got {template!r})")
        if not label_words:
            raise LmpipeError("prompting: no label words")
        before, after = template.split("{text}")
        self.cls_id = tokenizer.cls_token_id
        self.pad_id = tokenizer.pad_token_id
        if self.cls_id is None or self.pad_id is None:
            raise LmpipeError(f"prompting: tokenizer {type(tokenizer).__name__} has no [CLS] or [PAD] token")
        encoded = tokenize_texts(tokenizer, [before, after, SHOT_SEPARATOR, *label_words])
        self.before, self.after, self.separator = encoded[:3]
        self.labels = encoded[3:]
        for word, ids in zip(label_words, self.labels):
            if not ids:
                raise LmpipeError(f"prompting: label word {word!r} encodes to no token")
        self.max_length = max_length
        frame = len(self.before) + len(self.after)
        # context = [CLS] + k (frame + shot text + answer + separator) + frame + review + longest label
        fixed = 1 + frame + max(map(len, self.labels))
        fixed += sum(frame + len(self.labels[label]) + len(self.separator) for _, label in shots)
        room = max_length - fixed
        if room < len(shots) + 1:
            raise LmpipeError(
                f"prompting: the template, {len(shots)} examples and the longest label need {fixed} of the "
                f"{max_length} context tokens: no room left for the texts (fewer shots or a longer context)"
            )
        shot_texts = tokenize_texts(tokenizer, [text for text, _ in shots]) if shots else []
        per_text = room // (len(shots) + 1)
        self.prefix = [self.cls_id]
        for ids, (_, label) in zip(shot_texts, shots):
            self.prefix += self.before + head_tail(ids, per_text) + self.after + self.labels[label] + self.separator
        self.text_budget = max_length - len(self.prefix) - frame - max(map(len, self.labels))

    def prompt(self, text_ids: Sequence[int]) -> list[int]:
        """The prompt of one review (its token ids, cut to fit), without an answer."""
        return self.prefix + self.before + head_tail(text_ids, self.text_budget) + self.after


def continuation_log_probs(
    model: Any, prompts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad_id: int, batch_size: int
) -> np.ndarray:
    """[n] float64: sum of log p(continuation tokens | prompt) for each (prompt, continuation) pair.

    One forward per batch of right-padded prompt + continuation sequences; the logits at position
    t score the token at t + 1.
    """
    if batch_size < 1:
        raise LmpipeError(f"prompting: batch_size must be >= 1 (got {batch_size})")
    device = next(model.parameters()).device
    scores = np.empty(len(prompts), dtype=np.float64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for first in range(0, len(prompts), batch_size):
                rows = range(first, min(first + batch_size, len(prompts)))
                arrays = pad_batch([list(prompts[i]) + list(continuations[i]) for i in rows], pad_id)
                ids = torch.from_numpy(arrays["input_ids"]).to(device)
                mask = torch.from_numpy(arrays["attention_mask"]).to(device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                for row, i in enumerate(rows):
                    start, tokens = len(prompts[i]), torch.as_tensor(list(continuations[i]))
                    # the softmax over the vocabulary only where a continuation token is scored
                    log_probs = torch.log_softmax(logits[row, start - 1 : start - 1 + len(tokens)].double(), dim=-1)
                    scores[i] = float(log_probs.cpu()[torch.arange(len(tokens)), tokens].sum())
    finally:
        model.train(was_training)
    return scores


def label_log_probs(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    label_words: Sequence[str] = LABEL_WORDS,
    template: str = TEMPLATE,
    shots: Sequence[tuple[str, int]] = (),
    max_length: int | None = None,
    batch_size: int = 16,
) -> np.ndarray:
    """[len(texts), len(label_words)] float64: log p(label word | prompt of text), summed over the
    word's tokens. `shots` are (text, label id) examples shown before each text; `max_length`
    defaults to the model's context (`config.max_position_embeddings`)."""
    max_length = max_length or model.config.max_position_embeddings
    builder = PromptBuilder(tokenizer, label_words, template, shots, max_length)
    prompts = [builder.prompt(ids) for ids in tokenize_texts(tokenizer, texts)] if len(texts) else []
    pairs = [(p, label) for p in prompts for label in builder.labels]
    scores = continuation_log_probs(model, [p for p, _ in pairs], [c for _, c in pairs], builder.pad_id, batch_size)
    return scores.reshape(len(texts), len(label_words))


def zero_shot(model: Any, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> np.ndarray:
    """Predicted label ids [n] (int64) from the template alone; `kwargs` go to `label_log_probs`."""
    return label_log_probs(model, tokenizer, texts, **kwargs).argmax(axis=1)


def draw_shots(pool_labels: Sequence[int], k: int, n_labels: int, seed: int) -> list[int]:
    """Indices of k pool examples, balanced over the labels (k // n_labels each; the remainder
    goes to labels drawn at random) and in a seeded random order."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(pool_labels, dtype=np.int64)
    per_label = np.full(n_labels, k // n_labels)
    per_label[rng.permutation(n_labels)[: k % n_labels]] += 1
    chosen = []
    for label in range(n_labels):
        members = np.flatnonzero(labels == label)
        if len(members) < per_label[label]:
            raise LmpipeError(
                f"prompting: {k} shots need {per_label[label]} examples of label {label}; the pool has {len(members)}"
            )
        chosen.extend(rng.choice(members, size=per_label[label], replace=False).tolist())
    return [chosen[i] for i in rng.permutation(len(chosen))]


def few_shot(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    k: int,
    seed: int,
    pool_texts: Sequence[str],
    pool_labels: Sequence[int],
    label_words: Sequence[str] = LABEL_WORDS,
    **kwargs: Any,
) -> np.ndarray:
    """Predicted label ids [n] (int64) with k labelled examples of the pool (`draw_shots`) shown
    before every text; `kwargs` (template, max_length, batch_size) go to `label_log_probs`."""
    picks = draw_shots(pool_labels, k, len(label_words), seed)
    shots = [(pool_texts[i], int(pool_labels[i])) for i in picks]
    return label_log_probs(model, tokenizer, texts, label_words, shots=shots, **kwargs).argmax(axis=1)
