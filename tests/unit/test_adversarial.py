"""lmpipe.train.adversarial (FGM) and its hook in the training loop, on a tiny BERT classifier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import LoraParams, load_params, parse_params
from lmpipe.finetune import finetuning as ft
from lmpipe.inference import encoding
from lmpipe.train import adversarial, training
from lmpipe.train.training import TrainConfig, train
from tests.unit import test_finetuning as tiny
from tests.unit.test_finetuning import LABELS, VOCAB, make_reviews

backbone, tokenizer, project = tiny.backbone, tiny.tokenizer, tiny.project  # its fixtures, shared


def tiny_classifier(dropout: float = 0.0):
    """A 2-layer BERT classifier; dropout 0 makes two passes over a batch see the same network."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=2,
    )
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def a_batch(tokenizer, n=8, seed=1):
    texts, labels = make_reviews(n, seed)
    return encoding.collate(encoding.encode_texts(tokenizer, texts, 24, "head")["input_ids"], labels, 0)


def grads_after(model, batch, fgm=None):
    """Parameter gradients of one micro-batch, with or without the FGM hook."""
    model.zero_grad(set_to_none=True)

    def backward_pass(weight):
        loss, n = ft.classification_loss(model, batch)
        (loss / 1 if weight == 1.0 else loss * weight / 1).backward()
        return loss, n

    fgm(backward_pass) if fgm is not None else backward_pass(1.0)
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fgm_changes_the_gradient_and_never_the_embedding_weights(tokenizer):
    model, batch = tiny_classifier(), a_batch(tokenizer)
    plain = grads_after(model, batch)
    weights = model.get_input_embeddings().weight.detach().clone()
    fgm = adversarial.build("fgm", 1.0, model)
    attacked = grads_after(model, batch, fgm)
    assert plain.keys() == attacked.keys()
    assert any(not torch.allclose(plain[k], attacked[k]) for k in plain)
    assert torch.equal(model.get_input_embeddings().weight, weights)  # the weights are never perturbed
    fgm.close()
    assert all(torch.equal(plain[k], v) for k, v in grads_after(model, batch).items())  # hook gone


def test_epsilon_zero_is_no_fgm_bit_for_bit_through_the_loop(tokenizer, one_thread):
    texts, labels = make_reviews(32, seed=1)
    encoded = encoding.encode_texts(tokenizer, texts, 24, "head_tail")
    batch_at = ft.make_batch_at(encoded, labels, batch_size=8, grad_accum=1, seed=0, pad_id=0)
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=0, eval_every=100)
    states = []
    for eps in (None, 0.0, 1.0):
        model = tiny_classifier()
        hook = None if eps is None else adversarial.FGM(model.get_input_embeddings(), eps)
        kwargs = dict(evaluate=lambda m: {}, config=config, device=torch.device("cpu"), adversarial=hook)
        result = train(model, loss_fn=ft.classification_loss, batch_at=batch_at, **kwargs)
        states.append(result.state)
    off, zero, one = states
    assert all(torch.equal(off[k], zero[k]) for k in off)  # two exact halves of the same gradient
    assert any(not torch.equal(off[k], one[k]) for k in off)


def test_perturbation_has_norm_epsilon_along_the_gradient():
    fgm = adversarial.FGM(torch.nn.Embedding(3, 2), 0.5)
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    delta = fgm.perturbation(grad)
    torch.testing.assert_close(delta, torch.tensor([[0.3, 0.4], [0.0, 0.0]]))
    assert torch.equal(fgm.perturbation(torch.zeros(2, 2)), torch.zeros(2, 2))
    assert torch.equal(fgm.perturbation(torch.tensor([float("nan")])), torch.zeros(1))


@pytest.mark.parametrize("mode", ["frozen", "lora", "adalora", "prefix", "adapter"])
def test_fgm_reaches_frozen_embeddings_in_every_mode(backbone, tokenizer, mode):
    from tests.unit.test_peft_modes import build as build_peft

    if mode in ("frozen", "lora"):
        model = ft.build_classifier(backbone, LABELS, mode=mode, seed=0, lora=LoraParams(rank=4))
    else:
        model = build_peft(backbone, mode)
    model.eval()
    embeddings = adversarial.input_embeddings(model, "finetune.adversarial.method")
    assert not embeddings.weight.requires_grad
    batch = a_batch(tokenizer)
    plain = grads_after(model, batch)
    fgm = adversarial.build("fgm", 5.0, model)
    attacked = grads_after(model, batch, fgm)
    fgm.close()
    assert embeddings.weight.grad is None  # the frozen weights still get no gradient
    assert any(not torch.allclose(plain[k], attacked[k]) for k in plain)


def test_evaluation_is_never_perturbed(tokenizer):
    model, batch = tiny_classifier().eval(), a_batch(tokenizer)
    fgm = adversarial.FGM(model.get_input_embeddings(), 100.0)
    fgm._armed, fgm._delta = True, torch.ones(1)  # even mid-attack, no_grad forwards are clean
    with torch.no_grad():
        hooked = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    fgm._armed, fgm._delta = False, None
    fgm.close()
    with torch.no_grad():
        clean = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(hooked, clean)


def test_a_model_without_word_embeddings_is_refused_naming_the_key():
    with pytest.raises(LmpipeError, match=r"^params.yaml: finetune.adversarial.method needs a model with a word"):
        adversarial.build("fgm", 1.0, torch.nn.Linear(2, 2))
    assert adversarial.build("none", 1.0, torch.nn.Linear(2, 2)) is None


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("method", "pgd", r"finetune.adversarial.method must be one of 'none' or 'fgm' \(got 'pgd'\)"),
        ("epsilon", -1.0, r"finetune.adversarial.epsilon must be >= 0.0 \(got -1.0\)"),
    ],
)
def test_bad_adversarial_params_name_the_key(project_root, key, value, expected):
    raw = yaml.safe_load((project_root / "params.yaml").read_text())
    raw["finetune"]["adversarial"][key] = value
    with pytest.raises(LmpipeError, match=expected):
        parse_params(raw)


def test_stage_with_fgm_trains_and_differs_from_the_default(project, one_thread):
    from stages.finetune import main

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["finetune"]["adversarial"] = {"method": "fgm", "epsilon": 1.0}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    assert load_params().finetune.adversarial.method == "fgm"
    with pytest.warns(UserWarning, match="not reachable"):
        main(["tiny"])
    metrics = json.loads((project / "reports/finetune/tiny/metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["train_examples"] == 40
    curve = (project / "reports/finetune/tiny/train_curve.csv").read_text()
    raw["finetune"]["adversarial"]["method"] = "none"
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.warns(UserWarning, match="not reachable"):
        main(["tiny"])  # the same run without FGM
    assert (project / "reports/finetune/tiny/train_curve.csv").read_text() != curve


DDP_WORKER = textwrap.dedent("""
    import sys
    import torch
    from lmpipe.train import adversarial, distributed, training
    from tests.unit.test_distributed import setup
    torch.set_num_threads(1)
    rank = distributed.env_info().rank
    model, kwargs = setup(grad_accum=1, seed=rank)
    training.train(model, adversarial=adversarial.FGM(model.embed, 1.0), **kwargs)
    torch.save(model.state_dict(), f"{sys.argv[1]}/rank{rank}.pt")
    distributed.shutdown()
""")


def test_fgm_under_two_ddp_ranks_matches_one_process_with_accumulation(tmp_path, project_root, one_thread):
    """Each pass of the last micro-batch all-reduces what has accumulated: the same mean gradient."""
    from tests.unit.test_distributed import setup

    env = {**os.environ, "PYTHONPATH": str(project_root), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["--no-python", sys.executable, "-c", DDP_WORKER, str(tmp_path)]
    done = subprocess.run(command, cwd=project_root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model, kwargs = setup(grad_accum=2)
    fgm = training.train(model, adversarial=adversarial.FGM(model.embed, 1.0), **kwargs).state
    model, kwargs = setup(grad_accum=2)
    plain = training.train(model, **kwargs).state
    for key in fgm:
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # DDP keeps the ranks equal
    flat = {
        name: torch.cat([s[k].flatten().float() for k in sorted(fgm)])
        for name, s in (("ddp", ranks[0]), ("fgm", fgm), ("plain", plain))
    }
    off = float(torch.linalg.vector_norm(flat["ddp"] - flat["fgm"]))
    effect = float(torch.linalg.vector_norm(flat["fgm"] - flat["plain"]))
    # summation order differs (all-reduce vs accumulation), so not bit for bit; Adam amplifies
    # rounding on near-zero gradients, yet the DDP run stays far closer to FGM than FGM is to none
    assert off < 0.05 * effect
