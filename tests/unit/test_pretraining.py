"""`run_pretrain` under `pretrain.objective: clm`: metrics, samples in MLflow, exact resume, a bad pairing.

A tiny WordPiece tokenizer and packed token arrays are built from made-up documents
(tests/unit/test_tokenization.py); a 1-layer llama trains a few steps on one thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from safetensors.torch import save

from lmpipe.clm import batches as clm_batches
from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import Params
from lmpipe.pretrain import pretraining
from tests.unit.test_tokenization import build

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {
    "objective": "clm",
    "model": {"family": "llama", "num_layers": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64},
    "eval_batches": 2,
    "optim": {"warmup_steps": 1},
    "loop": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "log_every": 2},
}


def params(project_root, **pretrain):
    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    raw["base"]["threads"] = 1
    raw["pretrain"] = {**raw["pretrain"], **copy.deepcopy(TINY), **pretrain}
    raw["pretrain"]["model"] = {**raw["pretrain"]["model"], "max_length": 32}
    return Params.model_validate(raw)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    tok_dir, tokens_dir, _ = build(tmp_path_factory.mktemp("clm"))
    return tok_dir, tokens_dir


class Journal:
    """Records what a stage would send to MLflow (the tracker's interface the pretraining uses)."""

    def __init__(self) -> None:
        self.dicts: dict[str, dict] = {}

    def log_dict(self, obj, artifact_file):
        self.dicts[artifact_file] = obj

    def log_metrics(self, metrics, step=None):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def state_bytes(model) -> bytes:
    return save({k: v.detach().clone() for k, v in model.state_dict().items()})  # tied weights: copies


def test_causal_lm_pretraining_reports_references_and_logs_samples(tokens, project_root):
    tok_dir, tokens_dir = tokens
    journal = Journal()
    done = pretraining.run_pretrain(
        params(project_root), tokens_dir=tokens_dir, tokenizer_dir=tok_dir, device=torch.device("cpu"), tracker=journal
    )
    m = done.metrics
    assert type(done.model).__name__ == "LlamaForCausalLM" and m["steps"] == 4
    for key in ("val_perplexity", "unigram_perplexity", "bigram_perplexity", "perplexity_vs_bigram", "mfu"):
        assert m[key] > 0, key
    assert m["perplexity_vs_unigram"] == pytest.approx(m["val_perplexity"] / m["unigram_perplexity"])
    assert pretraining.headline(m)["ppl_vs_bigram"] == m["perplexity_vs_bigram"]
    # one sample file per evaluation (steps 2 and 4), every prompt continued greedy and sampled
    assert sorted(journal.dicts) == ["samples/eval_001.json", "samples/eval_002.json"]
    last = journal.dicts["samples/eval_002.json"]
    assert sorted(last) == sorted(pretraining.SAMPLE_PROMPTS)
    assert all(set(v) == {"greedy", "sampled"} and isinstance(v["greedy"], str) for v in last.values())


def test_killed_causal_lm_pretraining_resumes_to_identical_weights(tokens, project_root, tmp_path, monkeypatch):
    tok_dir, tokens_dir = tokens
    cpu = torch.device("cpu")
    reference = pretraining.run_pretrain(params(project_root), tokens_dir=tokens_dir, tokenizer_dir=tok_dir, device=cpu)
    original = clm_batches.CLMBatches.batch_at

    def crash_at_step_3(self, step, micro, rank, world):
        if step == 3:
            raise RuntimeError("killed at step 3")
        return original(self, step, micro, rank, world)

    ckpt = tmp_path / "ckpt"
    monkeypatch.setattr(clm_batches.CLMBatches, "batch_at", crash_at_step_3)
    with pytest.raises(RuntimeError, match="killed at step 3"):
        pretraining.run_pretrain(
            params(project_root), tokens_dir=tokens_dir, tokenizer_dir=tok_dir, device=cpu, checkpoint_dir=ckpt
        )
    monkeypatch.setattr(clm_batches.CLMBatches, "batch_at", original)
    torch.manual_seed(1234)  # the resuming process starts from other RNG states
    resumed = pretraining.run_pretrain(
        params(project_root), tokens_dir=tokens_dir, tokenizer_dir=tok_dir, device=cpu, checkpoint_dir=ckpt
    )
    assert resumed.metrics["resumed_from"] == 2
    assert state_bytes(resumed.model) == state_bytes(reference.model)


@pytest.mark.parametrize(
    "objective, family, message",
    [
        ("clm", "modernbert", "pretrain: objective: clm needs a decoder, model.family one of ['llama']"),
        ("mlm", "llama", "pretrain: objective: mlm needs an encoder"),
    ],
)
def test_objective_and_family_must_fit(project_root, tmp_path, objective, family, message):
    from lmpipe.core.params import load_params

    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    raw["pretrain"]["objective"], raw["pretrain"]["model"]["family"] = objective, family
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(LmpipeError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_params(path)


def test_lmpipe_generate_is_seeded_and_refuses_an_encoder(tokens, project_root, tmp_path, capsys):
    from lmpipe.cli.main import main
    from lmpipe.mlm import models

    tok_dir, tokens_dir = tokens
    done = pretraining.run_pretrain(
        params(project_root), tokens_dir=tokens_dir, tokenizer_dir=tok_dir, device=torch.device("cpu")
    )
    folder = tmp_path / "clm"
    models.save_mlm(done.model, tok_dir, folder)

    def generate(*flags):
        assert main(["generate", "the film", "--model", str(folder), "--max-new-tokens", "8", *flags]) == 0
        return capsys.readouterr().out

    greedy = generate()
    assert greedy.startswith("the film") and greedy == generate("--no-cache")  # the KV cache changes nothing
    sampled = [generate("--temperature", "1.5", "--seed", str(seed)) for seed in (1, 1, 2, 3)]
    assert sampled[0] == sampled[1] and len(set(sampled)) > 1  # same seed, same text; other seeds differ

    encoder = tmp_path / "mlm"
    encoder.mkdir()
    (encoder / "config.json").write_text('{"architectures": ["ModernBertForMaskedLM"]}')
    assert main(["generate", "x", "--model", str(encoder)]) == 2
    assert "a ModernBertForMaskedLM folder, not a causal LM" in capsys.readouterr().err
