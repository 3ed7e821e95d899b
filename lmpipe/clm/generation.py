"""Text generation from a causal LM: greedy or sampled (temperature, top-k, top-p), with a KV cache.

`generate` decodes one sequence token by token. With `use_cache` the first forward runs the
whole prompt and returns the keys and values of every layer (a transformers `DynamicCache`,
`out.cache` in transformers 5; `past_key_values` is its deprecated name); each later forward
feeds only the newest token with that cache, so a step costs one position, not the whole
prefix. Without it every step reruns the whole sequence: the same tokens, slower (a test holds
them equal).

Sampling: logits / temperature, then top-k (keep the k largest), then top-p (keep the smallest
set of most likely tokens whose probability reaches top_p, at least one), then one draw from a
CPU `torch.Generator` seeded by `seed`: the same seed gives the same tokens on any device.
temperature = 0 is greedy (argmax; the filters do not change it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lmpipe.core.errors import LmpipeError


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """A copy of 1-D `logits` with every token outside top-k, then outside the top-p nucleus, at -inf.

    top_k = 0 and top_p = 1 keep everything. The nucleus is the smallest set of the most likely
    tokens (probabilities from the softmax of what top-k left) whose mass reaches top_p: a token
    stays when the mass of the tokens ranked above it is below top_p, so the first always stays.
    """
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise LmpipeError(f"generate: top_k must be >= 0 and top_p in (0, 1] (got {top_k}, {top_p})")
    out = logits.clone()
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        probs, order = torch.sort(torch.softmax(out.double(), dim=-1), descending=True)
        mass_above = torch.cumsum(probs, dim=-1) - probs
        drop = order[mass_above >= top_p]
        out[drop] = float("-inf")
    return out


def next_token(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """The token to emit after 1-D `logits` (see the module docstring)."""
    if temperature < 0:
        raise LmpipeError(f"generate: temperature must be >= 0 (got {temperature})")
    if temperature == 0:
        return int(torch.argmax(logits))
    filtered = filter_logits(logits.detach().float().cpu() / temperature, top_k, top_p)
    return int(torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=gen))


def generate(
    model: Any,
    input_ids: Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> list[int]:
    """The new token ids (the prompt not repeated) continuing the 1-D prompt `input_ids`.

    Stops after `max_new_tokens`, after emitting `eos_id` (kept as the last id), or when the
    sequence fills the model's context (`config.max_position_embeddings`), whichever comes first.
    Runs under `torch.no_grad()` in eval mode; the model's training flag is restored after.
    """
    prompt = [int(t) for t in (input_ids.flatten().tolist() if isinstance(input_ids, torch.Tensor) else input_ids)]
    if not prompt:
        raise LmpipeError("generate: the prompt is empty (start it with the [CLS] id at least)")
    if max_new_tokens < 0:
        raise LmpipeError(f"generate: max_new_tokens must be >= 0 (got {max_new_tokens})")
    context = getattr(model.config, "max_position_embeddings", None) or len(prompt) + max_new_tokens
    if len(prompt) > context:
        raise LmpipeError(f"generate: the prompt holds {len(prompt)} tokens, more than the model's {context}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    sequence, new, cache = list(prompt), [], None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            while len(new) < max_new_tokens and len(sequence) < context:
                if use_cache:
                    feed = sequence if cache is None else sequence[-1:]
                    out = model(input_ids=torch.tensor([feed], device=device), cache=cache, use_cache=True)
                    cache = out.cache
                else:
                    out = model(input_ids=torch.tensor([sequence], device=device), use_cache=False)
                token = next_token(out.logits[0, -1], temperature, top_k, top_p, gen)
                sequence.append(token)
                new.append(token)
                if eos_id is not None and token == eos_id:
                    break
    finally:
        model.train(was_training)
    return new


def generate_text(model: Any, tokenizer: Any, prompt: str, **kwargs: Any) -> str:
    """The decoded continuation of `prompt`, encoded as [CLS] + its tokens (no [SEP]: the text
    goes on). `kwargs` go to `generate`; special tokens are left out of the text."""
    ids = [tokenizer.cls_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return tokenizer.decode(generate(model, ids, **kwargs), skip_special_tokens=True)
