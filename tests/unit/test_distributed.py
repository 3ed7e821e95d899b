"""lmpipe.train.distributed + the loop under a real `torchrun --nproc_per_node 2` (gloo, CPU).

Two processes with grad_accum=1 must end where one process with grad_accum=2 ends, for the
masked-LM objective and for the causal-LM one (a llama decoder on [CLS]-led windows): the same
global batch per step (shard = micro * world + rank), gradients averaged the same way. The
comparison is exact: with 2 ranks DDP's allreduce computes (g0 + g1) / 2 and accumulation
computes g0 / 2 + g1 / 2, and halving is exact in floating point, so the sums agree bit for bit
(on one thread per process, the same kernels run in both).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from lmpipe.mlm import masking
from lmpipe.train import distributed, training

PAD, UNK, CLS, SEP, MASK, VOCAB = 0, 1, 2, 3, 4, 60


pytestmark = pytest.mark.usefixtures("one_thread")


class TinyMLM(torch.nn.Module):
    """An embedding, one transformer layer and a head on the masked rows (no dropout)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.layer(self.embed(input_ids))
        selected = labels != masking.IGNORE
        return torch.nn.functional.cross_entropy(self.head(hidden[selected]), labels[selected])


def tiny_clm(seed: int, grad_accum: int):
    """A one-layer llama decoder and its [CLS]-led windows, as `pretrain.objective: clm` builds them."""
    from lmpipe.clm import batches as clm_batches
    from lmpipe.clm import models as clm_models
    from lmpipe.core.params import Architecture

    arch = Architecture(family="llama", num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32, max_length=16)
    lm = clm_models.build_clm(clm_models.clm_config(arch, VOCAB, {"cls": CLS, "sep": SEP, "pad": PAD}), seed)
    tokens = np.random.default_rng(0).integers(5, VOCAB, 4000).astype(np.uint16)
    data = clm_batches.CLMBatches(
        tokens, tokens[:400], max_length=16, batch_size=4, grad_accum=grad_accum, eval_batches=2, seed=0, cls_id=CLS
    )
    return clm_models.CausalLMObjective(lm), data, clm_models.objective_loss


def tiny_mlm(seed: int, grad_accum: int):
    torch.manual_seed(seed)
    model = TinyMLM()
    tokens = np.random.default_rng(0).integers(5, VOCAB, 4000).astype(np.uint16)
    data = masking.MLMBatches(
        tokens,
        tokens[:400],
        max_length=16,
        batch_size=4,
        grad_accum=grad_accum,
        eval_batches=2,
        seed=0,
        cls_id=CLS,
        sep_id=SEP,
        masking=masking.MaskingConfig(0.15, 0.8, 0.1, MASK, VOCAB, (PAD, UNK, CLS, SEP, MASK)),
    )
    return model, data, lambda m, b: (m(**b), b["input_ids"].numel())


def setup(grad_accum: int, seed: int = 0, objective: str = "mlm"):
    model, data, loss_fn = (tiny_clm if objective == "clm" else tiny_mlm)(seed, grad_accum)
    val = data.val_batches()
    config = training.TrainConfig(
        max_steps=6,
        grad_accum=grad_accum,
        lr=1e-2,
        warmup_steps=1,
        eval_every=3,
        checkpoint_every=3,
        log_every=2,
        early_stopping_metric="val_loss",
    )
    kwargs = dict(
        loss_fn=loss_fn,
        batch_at=data.batch_at,
        evaluate=lambda m: {"val_loss": sum(float(m(**b)) for b in val) / len(val)},
        config=config,
        device=torch.device("cpu"),
        fingerprint="ddp",
    )
    return model, kwargs


WORKER = textwrap.dedent("""
    import sys
    import torch
    from lmpipe.train import distributed
    from lmpipe.train import training
    from tests.unit.test_distributed import setup
    torch.set_num_threads(1)
    out = sys.argv[1]
    rank = distributed.env_info().rank
    steps = []
    from torch.optim.optimizer import register_optimizer_step_post_hook
    register_optimizer_step_post_hook(lambda *args: steps.append(1))
    # rank 1 starts elsewhere: DDP must broadcast rank 0
    model, kwargs = setup(grad_accum=1, seed=rank, objective=sys.argv[2])
    result = training.train(model, checkpoint_dir=f"{out}/ckpt", curves_dir=f"{out}/curves{rank}", **kwargs)
    info = distributed.current()
    torch.save({"state": model.state_dict(), "optimizer_steps": len(steps), "steps": result.steps,
                "world": info.world_size, "best_metrics": result.best_metrics}, f"{out}/rank{rank}.pt")
    distributed.shutdown()
""")


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_two_ranks_match_each_other_and_one_process_with_accumulation(tmp_path, project_root, objective):
    env = {**os.environ, "PYTHONPATH": str(project_root), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "--no-python",
            sys.executable,
            "-c",
            WORKER,
            str(tmp_path),
            objective,
        ],
        cwd=project_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    model, kwargs = setup(grad_accum=2, objective=objective)
    single = training.train(model, **kwargs)

    for got in ranks:
        assert got["world"] == 2 and got["steps"] == 6 and got["optimizer_steps"] == 6
        assert got["best_metrics"] == ranks[0]["best_metrics"]  # rank 0's eval, broadcast
        for key, value in ranks[0]["state"].items():
            assert torch.equal(got["state"][key], value), key  # ranks hold identical weights
    for key, value in single.state.items():
        assert torch.equal(ranks[0]["state"][key], value), key  # == one process, same global batch
    assert ranks[0]["best_metrics"] == single.best_metrics
    # only rank 0 writes: one checkpoint (with both ranks' RNG states), one set of curves
    checkpoint = torch.load(tmp_path / "ckpt" / training.CHECKPOINT_FILE, weights_only=True)
    assert checkpoint["step"] == 6 and len(checkpoint["ranks"]) == 2
    assert (tmp_path / "curves0" / "train_curve.csv").is_file() and not (tmp_path / "curves1").exists()


def test_a_plain_process_is_a_world_of_one(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info, device = distributed.init_from_env(torch.device("cpu"))
    assert (info.rank, info.world_size, info.enabled, info.is_main) == (0, 1, False, True)
    assert device == torch.device("cpu")
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert distributed.all_gather(3) == [3]
    assert distributed.all_reduce_sum([1.0, 2.0], device) == [1.0, 2.0]
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap(model, device) is model and distributed.unwrap(model) is model
