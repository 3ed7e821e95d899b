"""lmpipe.clm.prompting: label scores on a stub LM whose answers are known by hand, multi-token labels,
right padding, few-shot prompts (balanced, fitting the context) and review truncation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmpipe.clm import models, prompting
from lmpipe.core.errors import LmpipeError
from tests.unit.test_clm import SPECIAL, VOCAB, Arch

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = ["review", ":", "sentiment", "negative", "positive", "good", "bad", "the", "film", "was", "plot"]
WORDS += ["very", "not", "great"]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def make_tokenizer(size: int = VOCAB):
    """A lowercasing word-level tokenizer of `size` ids: the special tokens, WORDS, then fillers w0, w1, ..."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    tokens = SPECIALS + WORDS
    tokens += [f"w{i}" for i in range(size - len(tokens))]
    tok = Tokenizer(tok_models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "Sentiment:" -> "sentiment", ":"
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


TOK = make_tokenizer()
ID = {w: TOK.convert_tokens_to_ids(w) for w in SPECIALS + WORDS}
BOOST = 4.0


class StubLM(torch.nn.Module):
    """Logits known by hand: all 0, except at a ':' that follows 'sentiment', where the label of the
    current example ('positive' when it holds more 'good' than 'bad' since its 'review', else
    'negative') gets BOOST. Records every input batch."""

    def __init__(self, max_length: int = 64) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(max_position_embeddings=max_length, pad_token_id=ID["[PAD]"])
        self.inputs: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        self.inputs.append(input_ids.clone())
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for b, row in enumerate(input_ids.tolist()):
            score = 0
            for t, tok in enumerate(row):
                if tok == ID["review"]:
                    score = 0
                score += (tok == ID["good"]) - (tok == ID["bad"])
                if tok == ID[":"] and t > 0 and row[t - 1] == ID["sentiment"]:
                    logits[b, t, ID["positive"] if score > 0 else ID["negative"]] = BOOST
        return SimpleNamespace(logits=logits)


TEXTS = ["the film was good", "Bad plot", "good good film, not bad", "The plot was bad"]
ANSWERS = [1, 0, 1, 0]
POOL_TEXTS = [f"the film was {'good' if i % 2 else 'bad'} " + "w7 " * 30 for i in range(12)]
POOL_LABELS = [i % 2 for i in range(12)]


def tiny_llama(seed: int = 0, max_length: int = 64):
    return models.build_clm(models.clm_config(Arch(max_length=max_length), VOCAB, SPECIAL), seed).eval()


# --------------------------------------------------------------------------- the stub: known answers
def test_zero_shot_returns_the_known_answers():
    assert prompting.zero_shot(StubLM(), TOK, TEXTS).tolist() == ANSWERS


def test_label_scores_are_the_log_probs_right_after_the_prompt():
    scores = prompting.label_log_probs(StubLM(), TOK, TEXTS[:2], batch_size=1)
    favoured = BOOST - math.log(VOCAB - 1 + math.exp(BOOST))
    other = -math.log(VOCAB - 1 + math.exp(BOOST))
    np.testing.assert_allclose(scores, [[other, favoured], [favoured, other]], rtol=1e-6)


def test_prompt_is_cls_then_the_template_tokens():
    stub = StubLM()
    prompting.label_log_probs(stub, TOK, ["the film was good"], batch_size=2)
    words = ["[CLS]", "review", ":", "the", "film", "was", "good", "sentiment", ":"]
    rows = stub.inputs[0].tolist()
    assert rows == [[ID[w] for w in words] + [ID["negative"]], [ID[w] for w in words] + [ID["positive"]]]


def test_long_reviews_keep_their_end_and_fit_the_context():
    stub = StubLM(max_length=32)
    text = "bad " + "w3 " * 200 + "good good"  # the verdict at the end survives the cut
    assert prompting.zero_shot(stub, TOK, [text]).tolist() == [1]
    assert stub.inputs[0].shape[1] <= 32


def test_few_shot_predicts_with_k_examples_shown():
    stub = StubLM(max_length=64)
    got = prompting.few_shot(stub, TOK, TEXTS, k=4, seed=0, pool_texts=POOL_TEXTS, pool_labels=POOL_LABELS)
    assert got.tolist() == ANSWERS
    assert all(int((row == ID["review"]).sum()) == 5 for row in stub.inputs[0])


# --------------------------------------------------------------------------- few-shot prompts
def test_few_shot_prompt_holds_k_balanced_examples_and_fits_the_context():
    picks = prompting.draw_shots(POOL_LABELS, 4, 2, seed=1)
    shots = [(POOL_TEXTS[i], POOL_LABELS[i]) for i in picks]
    builder = prompting.PromptBuilder(TOK, prompting.LABEL_WORDS, prompting.TEMPLATE, shots, max_length=64)
    prompt = builder.prompt(TOK("good " * 100, add_special_tokens=False)["input_ids"])
    assert len(prompt) + max(map(len, builder.labels)) <= 64
    assert prompt[0] == ID["[CLS]"] and prompt[-2:] == [ID["sentiment"], ID[":"]]
    answers = [prompt[t + 1] for t in range(len(prompt) - 1) if prompt[t - 1 : t + 1] == [ID["sentiment"], ID[":"]]]
    assert sorted(answers) == [ID["negative"]] * 2 + [ID["positive"]] * 2
    assert answers == [ID[prompting.LABEL_WORDS[POOL_LABELS[i]].strip()] for i in picks]


def test_draw_shots_is_balanced_seeded_and_mixed():
    labels = [0] * 10 + [1] * 10
    picks = prompting.draw_shots(labels, 6, 2, seed=3)
    assert sorted(labels[i] for i in picks) == [0, 0, 0, 1, 1, 1] and len(set(picks)) == 6
    assert picks == prompting.draw_shots(labels, 6, 2, seed=3)
    assert {tuple(prompting.draw_shots(labels, 6, 2, seed=s)) for s in range(5)} != {tuple(picks)}
    counts = [np.bincount([labels[i] for i in prompting.draw_shots(labels, 5, 2, seed=s)]) for s in range(8)]
    assert all(sorted(c) == [2, 3] for c in counts)
    assert {int(c.argmax()) for c in counts} == {0, 1}  # the odd shot goes to either label
    orders = {tuple(labels[i] for i in prompting.draw_shots(labels, 6, 2, seed=s)) for s in range(8)}
    assert len(orders) > 1  # not always all negatives first
    with pytest.raises(LmpipeError, match="label 1"):
        prompting.draw_shots([0] * 10 + [1], 4, 2, seed=0)


def test_prompts_that_cannot_fit_the_context_raise():
    shots = [(POOL_TEXTS[i], POOL_LABELS[i]) for i in range(8)]
    with pytest.raises(LmpipeError, match="no room left"):
        prompting.PromptBuilder(TOK, prompting.LABEL_WORDS, prompting.TEMPLATE, shots, max_length=40)


def test_head_tail_keeps_a_quarter_from_the_start_and_the_rest_from_the_end():
    assert prompting.head_tail(list(range(20)), 8) == [0, 1, 14, 15, 16, 17, 18, 19]
    assert prompting.head_tail([1, 2, 3], 8) == [1, 2, 3]


# --------------------------------------------------------------------------- a real decoder
def test_multi_token_label_words_sum_their_tokens():
    model = tiny_llama()
    labels = (" not great", " very good")
    got = prompting.label_log_probs(model, TOK, ["the film was good"], labels)
    prompt = [ID[w] for w in ["[CLS]", "review", ":", "the", "film", "was", "good", "sentiment", ":"]]
    for j, words in enumerate([["not", "great"], ["very", "good"]]):
        ids = torch.tensor([prompt + [ID[w] for w in words]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        expected = float(log_probs[len(prompt) - 1, ID[words[0]]] + log_probs[len(prompt), ID[words[1]]])
        assert got[0, j] == pytest.approx(expected, abs=1e-5)


def test_right_padded_batches_score_as_one_prompt_at_a_time():
    model = tiny_llama(seed=2)
    texts = ["good", "the film was very bad and the plot was not great", "w1 w2 w3 film", "bad"]
    batched = prompting.label_log_probs(model, TOK, texts, batch_size=8)
    single = prompting.label_log_probs(model, TOK, texts, batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert batched.shape == (4, 2)
