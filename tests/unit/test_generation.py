"""lmpipe.clm.generation: greedy equals transformers' generate, the KV cache changes nothing, seeded
sampling, the top-k / top-p filters on hand-made distributions, and every stopping rule."""

from __future__ import annotations

import math

import pytest
import torch

from lmpipe.clm import generation, models
from tests.unit.test_clm import CLS, SPECIAL, VOCAB, Arch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [CLS, 17, 42, 8, 99]


@pytest.fixture(scope="module")
def model():
    config = models.clm_config(Arch(max_length=32), VOCAB, SPECIAL)
    config.initializer_range = 0.3  # sharper logits than 0.02: no near-ties for the argmax to flip on
    torch.manual_seed(0)
    return models.build_clm(config, 0).eval()


def greedy(model, **kwargs):
    return generation.generate(model, PROMPT, max_new_tokens=12, **kwargs)


def test_greedy_equals_transformers_generate(model):
    ids = torch.tensor([PROMPT])
    expected = model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert greedy(model) == expected
    assert len(expected) == 12


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.7, "top_p": 0.9}])
def test_kv_cache_on_and_off_give_the_same_tokens(model, sampling):
    assert greedy(model, use_cache=True, **sampling) == greedy(model, use_cache=False, **sampling)


def test_top_k_one_is_greedy(model):
    assert greedy(model, temperature=1.0, top_k=1, seed=5) == greedy(model)


def test_same_seed_same_tokens_other_seeds_other_tokens(model):
    runs = {seed: tuple(greedy(model, temperature=1.5, seed=seed)) for seed in range(4)}
    assert runs[0] == tuple(greedy(model, temperature=1.5, seed=0))
    assert len(set(runs.values())) > 1


def test_prompt_tensor_and_list_give_the_same_tokens(model):
    assert generation.generate(model, torch.tensor(PROMPT), max_new_tokens=5) == greedy(model)[:5]


def test_max_new_tokens_eos_and_context_stop_generation(model):
    reference = greedy(model)
    assert len(generation.generate(model, PROMPT, max_new_tokens=7)) == 7
    assert generation.generate(model, PROMPT, max_new_tokens=0) == []
    eos = reference[3]
    stopped = greedy(model, eos_id=eos)
    assert stopped == reference[: reference.index(eos) + 1]
    long_prompt = [CLS, *range(5, 32)]  # 28 tokens in a 32-token context
    assert len(generation.generate(model, long_prompt, max_new_tokens=10)) == 4


def test_generation_leaves_the_training_flag_as_it_was(model):
    model.train()
    try:
        greedy(model)
        assert model.training
    finally:
        model.eval()


# --------------------------------------------------------------------------- the filters
PROBS = torch.tensor([0.05, 0.5, 0.15, 0.3], dtype=torch.float64)


def kept(top_k: int = 0, top_p: float = 1.0) -> set[int]:
    out = generation.filter_logits(PROBS.log(), top_k, top_p)
    return set(torch.isfinite(out).nonzero().flatten().tolist())


def test_top_p_keeps_the_smallest_nucleus_that_reaches_the_mass():
    assert kept(top_p=0.5) == {1}  # 0.5 alone reaches 0.5
    assert kept(top_p=0.75) == {1, 3}  # 0.5 + 0.3
    assert kept(top_p=0.85) == {1, 3, 2}  # 0.95 >= 0.85; 0.8 is not enough
    assert kept(top_p=0.01) == {1}  # never empty
    assert kept(top_p=1.0) == {0, 1, 2, 3}


def test_top_k_then_top_p_on_the_renormalised_rest():
    assert kept(top_k=2) == {1, 3}
    # after top-3 the mass is 0.5, 0.3, 0.15 over 0.95: 0.526 + 0.316 = 0.842 reaches 0.8 but not 0.9
    assert kept(top_k=3, top_p=0.8) == {1, 3}
    assert kept(top_k=3, top_p=0.9) == {1, 3, 2}


def test_filter_keeps_the_kept_logits_unchanged():
    logits = torch.tensor([1.0, 3.0, 2.0])
    out = generation.filter_logits(logits, top_k=2)
    assert out[1] == 3.0 and out[2] == 2.0 and out[0] == -math.inf
    assert torch.equal(logits, torch.tensor([1.0, 3.0, 2.0]))  # the input is not modified


def test_sampling_draws_follow_the_filtered_distribution():
    gen = torch.Generator().manual_seed(0)
    draws = [generation.next_token(PROBS.log().float(), 1.0, 0, 0.75, gen) for _ in range(2000)]
    assert set(draws) == {1, 3}
    assert draws.count(1) / len(draws) == pytest.approx(0.5 / 0.8, abs=0.04)


# --------------------------------------------------------------------------- text
def test_generate_text_starts_with_cls_and_decodes_the_continuation(model, tmp_path):
    from tests.unit.test_prompting import make_tokenizer

    tokenizer = make_tokenizer()
    seen = []
    handle = model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True
    )
    try:
        text = generation.generate_text(model, tokenizer, "the film was", max_new_tokens=4)
    finally:
        handle.remove()
    prompt = [tokenizer.cls_token_id, *tokenizer("the film was", add_special_tokens=False)["input_ids"]]
    assert seen[0][0].tolist() == prompt  # [CLS] + the prompt, no [SEP]
    continuation = generation.generate(model, prompt, max_new_tokens=4)
    assert text == tokenizer.decode(continuation, skip_special_tokens=True)
