"""lmpipe.train.training: the one loop (optimisation, schedule, checkpoints, exact resume, early stopping)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import Architecture
from lmpipe.mlm import masking
from lmpipe.train import training

CPU = torch.device("cpu")
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4


# --------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def regression_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1)
    )


TRUE_W = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])


def regression_batch(step: int, micro: int, rank: int, world: int, size: int = 16) -> dict[str, torch.Tensor]:
    gen = masking.generator(step, training.shard_index(micro, rank, world))
    x = torch.randn(size, 4, generator=gen)
    return {"x": x, "y": x @ TRUE_W}


def mse(model, batch):
    return torch.nn.functional.mse_loss(model(batch["x"]), batch["y"]), batch["x"].shape[0]


def regression_eval(model):
    return {"val_loss": float(mse(model, regression_batch(10_000, 0, 0, 1, 64))[0])}


def config(**overrides) -> training.TrainConfig:
    base = dict(
        max_steps=12,
        grad_accum=1,
        lr=1e-2,
        weight_decay=0.01,
        betas=(0.9, 0.999),
        warmup_steps=2,
        min_lr_ratio=0.1,
        clip_norm=1.0,
        eval_every=4,
        checkpoint_every=3,
        log_every=2,
    )
    base.update(overrides)
    return training.TrainConfig(**base)


def run(model, cfg, tmp_path=None, batch_at=regression_batch, fingerprint="f", **kwargs):
    return training.train(
        model,
        loss_fn=mse,
        batch_at=batch_at,
        evaluate=regression_eval,
        config=cfg,
        device=CPU,
        checkpoint_dir=tmp_path,
        fingerprint=fingerprint,
        **kwargs,
    )


def state_bytes(state) -> dict[str, bytes]:
    return {k: v.detach().cpu().contiguous().numpy().tobytes() for k, v in state.items()}


# tiny BERT masked-LM on a learnable corpus: a repeating 40-token pattern
ARCH = Architecture(
    family="bert", num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64, max_length=16, dropout=0.1
)
PATTERN = (np.arange(3000) % 40 + 5).astype(np.uint16)


def mlm_setup(seed: int = 0):
    from lmpipe.mlm import models  # transformers: imported only by the tests that use it

    mlm = models.build_mlm(models.mlm_config(ARCH, 100, {"pad": PAD, "cls": CLS, "sep": SEP}), seed)
    cfg = masking.MaskingConfig(0.15, 0.8, 0.1, MASK, 100, (PAD, UNK, CLS, SEP, MASK))
    data = masking.MLMBatches(
        PATTERN,
        PATTERN[:600],
        max_length=16,
        batch_size=8,
        grad_accum=1,
        eval_batches=2,
        seed=seed,
        cls_id=CLS,
        sep_id=SEP,
        masking=cfg,
    )
    val = data.val_batches()
    return models.MaskedLMObjective(mlm), data, lambda obj: models.evaluate_mlm(obj.mlm, val, CPU)


def train_mlm(cfg, checkpoint_dir=None, batch_at=None, seed=0):
    from lmpipe.mlm import models

    objective, data, evaluate = mlm_setup(seed)
    result = training.train(
        objective,
        loss_fn=models.objective_loss,
        batch_at=batch_at or data.batch_at,
        evaluate=evaluate,
        config=cfg,
        device=CPU,
        checkpoint_dir=checkpoint_dir,
        fingerprint="mlm",
    )
    return objective, result


# --------------------------------------------------------------------------- learning
def test_mlm_loss_falls_on_a_learnable_task():
    # 40 distinct tokens out of 100: from uniform guessing (ln 100 = 4.61) the held-out loss
    # must fall toward the corpus' unigram entropy (ln 40 = 3.69)
    _, result = train_mlm(config(max_steps=40, lr=1e-2, warmup_steps=4, eval_every=40, log_every=5))
    losses = [row["loss"] for row in result.history["train"]]
    assert losses[-1] < 0.88 * losses[0]
    assert result.final_metrics["val_loss"] < 4.0


def test_accumulation_matches_one_big_batch():
    def big(step, micro, rank, world):
        a, b = regression_batch(step, 0, 0, 1, 8), regression_batch(step, 1, 0, 1, 8)
        return {k: torch.cat([a[k], b[k]]) for k in a}

    cfg = config(max_steps=6, clip_norm=None)
    one = run(_no_dropout(regression_model()), cfg, batch_at=big).state
    two = run(
        _no_dropout(regression_model()),
        config(max_steps=6, clip_norm=None, grad_accum=2),
        batch_at=lambda s, m, r, w: regression_batch(s, m, r, w, 8),
    ).state
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


def _no_dropout(model):
    model[2].p = 0.0
    return model


# --------------------------------------------------------------------------- determinism and resume
def test_same_seed_twice_gives_identical_weights():
    first = run(regression_model(), config()).state
    second = run(regression_model(), config()).state
    assert state_bytes(first) == state_bytes(second)


def test_resume_after_crash_gives_identical_weights(tmp_path):
    cfg = config(max_steps=9, eval_every=4, checkpoint_every=3, lr=5e-3)
    _, uninterrupted = train_mlm(cfg)

    def crash_at_step_7(step, micro, rank, world):
        if step == 7:
            raise RuntimeError("simulated crash")
        return data.batch_at(step, micro, rank, world)

    _, data, _ = mlm_setup()
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_mlm(cfg, tmp_path, batch_at=crash_at_step_7)
    assert torch.load(tmp_path / training.CHECKPOINT_FILE, weights_only=True)["step"] == 6
    torch.manual_seed(1234)  # the resumed process starts from other RNG states
    _, resumed = train_mlm(cfg, tmp_path)
    assert resumed.resumed_from == 6 and resumed.steps == 9
    assert state_bytes(resumed.state) == state_bytes(uninterrupted.state)
    assert resumed.history == uninterrupted.history | {"train": resumed.history["train"]}
    assert [r["step"] for r in resumed.history["train"]] == [r["step"] for r in uninterrupted.history["train"]]


VICTIM = textwrap.dedent("""
    import os, sys, time
    import torch
    from tests.unit.test_training import regression_model, regression_batch, mse, regression_eval, config
    from lmpipe.train import training
    torch.set_num_threads(1)
    ckpt, hung, go = sys.argv[1:4]

    def batch_at(step, micro, rank, world):
        if step == 7:  # after the step-6 checkpoint: announce, wait for the signal
            open(hung, "w").close()
            deadline = time.monotonic() + 600
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.02)
        return regression_batch(step, micro, rank, world)

    training.train(regression_model(), loss_fn=mse, batch_at=batch_at, evaluate=regression_eval,
                   config=config(max_steps=10, log_every=5), device=torch.device("cpu"), checkpoint_dir=ckpt,
                   fingerprint="kill")
""")


def _signal_victim(tmp_path, project_root, signum):
    """Run VICTIM in a real process, send it `signum` while it is in step 7; return its exit code."""
    hung, go, ckpt = tmp_path / "hung", tmp_path / "go", tmp_path / "ckpt"
    victim = subprocess.Popen(
        [sys.executable, "-c", VICTIM, str(ckpt), str(hung), str(go)],
        cwd=project_root,
        env={**os.environ, "PYTHONPATH": str(project_root)},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while not hung.exists() and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert victim.poll() is None, victim.stderr.read().decode()
    victim.send_signal(signum)
    time.sleep(0.2)
    go.touch()
    stderr = victim.communicate(timeout=60)[1].decode()
    return victim.returncode, stderr, ckpt


def test_resume_after_kill_gives_identical_weights(tmp_path, project_root):
    """A real process is SIGKILLed mid-step; a new run resumes from the last periodic checkpoint."""
    code, _, ckpt = _signal_victim(tmp_path, project_root, signal.SIGKILL)
    assert code == -signal.SIGKILL
    reference = run(regression_model(), config(max_steps=10, log_every=5), fingerprint="kill")
    torch.manual_seed(99)  # the resuming process has other RNG states
    resumed = run(regression_model(seed=5), config(max_steps=10, log_every=5), ckpt, fingerprint="kill")
    assert resumed.resumed_from == 6 and resumed.steps == 10
    assert state_bytes(resumed.state) == state_bytes(reference.state)


def test_sigterm_checkpoints_the_step_in_flight_then_resumes_identically(tmp_path, project_root):
    code, stderr, ckpt = _signal_victim(tmp_path, project_root, signal.SIGTERM)
    assert code != 0 and "Terminated: signal 15: checkpoint at step 8" in stderr
    reference = run(regression_model(), config(max_steps=10, log_every=5), fingerprint="kill")
    resumed = run(regression_model(seed=5), config(max_steps=10, log_every=5), ckpt, fingerprint="kill")
    assert resumed.resumed_from == 8
    assert state_bytes(resumed.state) == state_bytes(reference.state)
    # the step-10 curve row averages steps 6-10 although steps 6-8 ran in the killed process
    assert [(r["step"], r["loss"]) for r in resumed.history["train"]] == [
        (r["step"], r["loss"]) for r in reference.history["train"]
    ]


def test_checkpoint_with_another_fingerprint_is_not_resumed(tmp_path):
    run(regression_model(), config(max_steps=6), tmp_path, fingerprint="old-data")
    fresh = run(regression_model(), config(max_steps=6), tmp_path, fingerprint="new-data")
    assert fresh.resumed_from == 0
    assert state_bytes(fresh.state) == state_bytes(run(regression_model(), config(max_steps=6)).state)
    again = run(regression_model(), config(max_steps=6), tmp_path, fingerprint="new-data")
    assert again.resumed_from == 6  # the mismatched checkpoint was overwritten


def test_another_config_does_not_resume(tmp_path):
    run(regression_model(), config(max_steps=6), tmp_path)
    assert run(regression_model(), config(max_steps=6, lr=2e-2), tmp_path).resumed_from == 0


def test_finished_run_returns_from_its_checkpoint_without_training(tmp_path):
    first = run(regression_model(), config(), tmp_path)

    def no_batches(*args):
        raise AssertionError("a finished run must not train again")

    again = run(regression_model(seed=9), config(), tmp_path, batch_at=no_batches)
    assert again.resumed_from == 12 and again.steps == 12
    assert state_bytes(again.state) == state_bytes(first.state)
    assert again.final_metrics == first.final_metrics and str(again.history) == str(first.history)


# --------------------------------------------------------------------------- optimisation pieces
def test_frozen_params_stay_unchanged():
    model = regression_model()
    for param in model[0].parameters():
        param.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = run(model, config())
    assert torch.equal(result.state["0.weight"], before["0.weight"])
    assert torch.equal(result.state["0.bias"], before["0.bias"])
    assert not torch.equal(result.state["3.weight"], before["3.weight"])


def test_weight_decay_groups_exclude_biases_and_norm_weights():
    objective, _, _ = mlm_setup()
    decay, keep = training.param_groups(objective, 0.01)
    names = {id(p): n for n, p in objective.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in keep["params"]}
    assert decay["weight_decay"] == 0.01 and keep["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "LayerNorm" not in n for n in decayed)
    assert "mlm.bert.embeddings.word_embeddings.weight" in decayed
    assert "mlm.bert.encoder.layer.0.attention.self.query.weight" in decayed
    assert {
        "mlm.bert.embeddings.LayerNorm.weight",
        "mlm.bert.encoder.layer.0.output.dense.bias",
        "mlm.cls.predictions.bias",
    } <= kept
    assert len(decayed) + len(kept) == len(list(objective.parameters()))


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = config(max_steps=11, warmup_steps=4, min_lr_ratio=0.1)
    factors = [training.lr_factor(s, cfg) for s in range(11)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[-1] == pytest.approx(0.1)
    middle = 4 + (10 - 4) / 2
    assert training.lr_factor(int(middle), cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))


def test_logged_lr_follows_the_schedule(tmp_path):
    result = run(regression_model(), config(log_every=1))
    logged = [row["lr"] for row in result.history["train"]]
    assert logged == pytest.approx([1e-2 * training.lr_factor(s, config()) for s in range(12)])


def test_clipping_scales_gradients_to_clip_norm_and_logs_the_raw_norm():
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def grad_norm_at_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))

    handle = register_optimizer_step_pre_hook(grad_norm_at_step)
    try:
        result = run(regression_model(), config(max_steps=3, clip_norm=0.01))
    finally:
        handle.remove()
    assert seen == pytest.approx([0.01] * 3, rel=1e-4)
    assert all(row["grad_norm"] > 0.1 for row in result.history["train"])


# --------------------------------------------------------------------------- early stopping, outputs
def test_early_stopping_keeps_the_best_weights_and_stops_after_patience():
    snapshots, values = {}, iter([3.0, 1.0, 2.0, 2.5, 0.5, 0.1])

    def evaluate(model):
        value = next(values)
        snapshots[value] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"val_loss": value, "val_accuracy": -value}

    model = regression_model()
    result = training.train(
        model,
        loss_fn=mse,
        batch_at=regression_batch,
        evaluate=evaluate,
        config=config(max_steps=40, eval_every=2, early_stopping_metric="val_loss", patience=2),
        device=CPU,
    )
    assert result.stopped_early and result.steps == 8 and result.best_step == 4
    assert result.best_metrics["val_loss"] == 1.0 and result.final_metrics["val_loss"] == 2.5
    assert state_bytes(result.state) == state_bytes(snapshots[1.0])
    assert state_bytes(model.state_dict()) == state_bytes(snapshots[1.0])


def test_higher_is_better_metric():
    values = iter([0.5, 0.7, 0.6])
    result = training.train(
        regression_model(),
        loss_fn=mse,
        batch_at=regression_batch,
        evaluate=lambda m: {"acc": next(values)},
        config=config(max_steps=6, eval_every=2, early_stopping_metric="acc", higher_is_better=True),
        device=CPU,
    )
    assert result.best_step == 4 and result.best_metrics == {"acc": 0.7} and not result.stopped_early


def test_unknown_early_stopping_metric_names_the_keys():
    with pytest.raises(LmpipeError, match=r"'val_f1' is not one of \['val_loss'\]"):
        run(regression_model(), config(early_stopping_metric="val_f1"))


def test_curves_and_tracker_get_every_row(tmp_path):
    class Sink:
        def __init__(self):
            self.calls = []

        def log_metrics(self, metrics, step=None):
            self.calls.append((step, dict(metrics)))

    sink = Sink()
    perf = tmp_path / "perf" / "curve.csv"
    run(
        regression_model(),
        config(),
        tracker=sink,
        curves_dir=tmp_path,
        perf_curve=perf,
        flops_per_token=100.0,
        peak_flops=1e9,
    )
    with open(tmp_path / "train_curve.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == list(training.TRAIN_COLUMNS)  # no timing: the same bytes on a rerun
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    with open(perf) as handle:
        perf_rows = list(csv.DictReader(handle))
    assert list(perf_rows[0]) == list(training.PERF_COLUMNS) and [int(r["step"]) for r in perf_rows] == [
        2,
        4,
        6,
        8,
        10,
        12,
    ]
    assert all(float(r["tokens_per_s"]) > 0 and 0 < float(r["mfu"]) for r in perf_rows)
    with open(tmp_path / "eval_curve.csv") as handle:
        assert [r["step"] for r in csv.DictReader(handle)] == ["4", "8", "12"]
    train_steps = [s for s, m in sink.calls if "train_loss" in m]
    eval_steps = [s for s, m in sink.calls if "val_loss" in m]
    assert train_steps == [2, 4, 6, 8, 10, 12] and eval_steps == [4, 8, 12]
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s", "mfu"} <= set(sink.calls[0][1])


def test_diverging_loss_stops_with_an_actionable_error():
    def nan_loss(model, batch):
        return model(batch["x"]).sum() * float("nan"), 1

    with pytest.raises(LmpipeError, match="diverged at step 1"):
        training.train(
            regression_model(),
            loss_fn=nan_loss,
            batch_at=regression_batch,
            evaluate=regression_eval,
            config=config(),
            device=CPU,
        )


def test_bad_config_names_the_field():
    with pytest.raises(ValueError, match="precision"):
        config(precision="fp16")


def test_precision_auto_is_fp32_on_cpu():
    assert training.resolve_precision("auto", CPU) == "fp32"
    assert training.resolve_precision("bf16", CPU) == "bf16"


def test_finish_checkpoint_leaves_a_small_marker_that_is_never_resumed(tmp_path):
    from lmpipe.train.training import CHECKPOINT_FILE, finish_checkpoint, load_checkpoint

    (tmp_path / CHECKPOINT_FILE).write_bytes(b"x" * 1000)
    finish_checkpoint(tmp_path, steps=7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished.json"]
    assert (tmp_path / "finished.json").read_text() == '{"finished": true, "steps": 7}\n'
    assert load_checkpoint(tmp_path, "any") is None


def test_lr_scales_put_matching_parameters_in_groups_at_a_multiple_of_the_lr():
    objective, _, _ = mlm_setup()
    scales = ((r"encoder\.layer\.1\.", 0.5), (r"embeddings\.", 0.25))
    config = training.TrainConfig(max_steps=4, lr=1e-3, warmup_steps=0, lr_scales=scales)
    optimizer, scheduler = training.build_optimizer(objective, config)
    names = {id(p): n for n, p in objective.named_parameters()}
    by_lr = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            by_lr[names[id(p)]] = group["lr"]
    assert by_lr["mlm.bert.encoder.layer.1.attention.self.query.weight"] == pytest.approx(5e-4)
    assert by_lr["mlm.bert.embeddings.word_embeddings.weight"] == pytest.approx(2.5e-4)
    assert by_lr["mlm.bert.encoder.layer.0.attention.self.query.weight"] == pytest.approx(1e-3)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)  # the logged lr is the unscaled one
    optimizer.step()
    scheduler.step()  # the schedule multiplies every group's own lr
    ratio = training.lr_factor(1, config)
    assert by_lr and all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"] * ratio) for g in optimizer.param_groups)


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_one_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _drop_hash(path):
    path.with_name(path.name + ".sha256").unlink()


@pytest.mark.parametrize("corrupt", [_truncate, _flip_one_byte, _drop_hash])
def test_corrupt_checkpoint_is_named_in_one_line_and_training_starts_clean(tmp_path, caplog, corrupt):
    cfg = config(max_steps=9)

    def crash_at_step_7(step, micro, rank, world):
        if step == 7:
            raise RuntimeError("simulated crash")
        return regression_batch(step, micro, rank, world)

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(regression_model(), cfg, tmp_path, batch_at=crash_at_step_7)
    checkpoint = tmp_path / training.CHECKPOINT_FILE
    assert (tmp_path / "checkpoint.pt.sha256").read_text().split() == [
        training.file_sha256(checkpoint),
        "checkpoint.pt",
    ]
    corrupt(checkpoint)
    with caplog.at_level("WARNING", logger="lmpipe.train.training"):
        rerun = run(regression_model(), cfg, tmp_path)
    assert rerun.resumed_from == 0 and rerun.steps == 9
    assert state_bytes(rerun.state) == state_bytes(run(regression_model(), cfg).state)
    named = [r.getMessage() for r in caplog.records if str(checkpoint) in r.getMessage()]
    assert len(named) == 1 and "training starts from step 0" in named[0] and "\n" not in named[0]
    assert training.checkpoint_problem(checkpoint) is None  # rewritten intact by the clean run
    training.finish_checkpoint(tmp_path, steps=9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished.json"]


# --------------------------------------------------------------------------- fused AdamW (off by default)
def test_fused_adamw_is_deterministic_and_makes_the_same_update_up_to_rounding():
    default = run(regression_model(), config(max_steps=8))
    fused = run(regression_model(), config(max_steps=8, fused=True))
    again = run(regression_model(), config(max_steps=8, fused=True))
    assert state_bytes(fused.state) == state_bytes(again.state)
    for name, value in default.state.items():
        torch.testing.assert_close(fused.state[name], value, rtol=1e-4, atol=1e-5)
    assert [r["loss"] for r in fused.history["train"]] == pytest.approx(
        [r["loss"] for r in default.history["train"]], rel=1e-4
    )


def test_fused_off_keeps_the_checkpoint_fingerprint_of_runs_before_the_option():
    import dataclasses
    import hashlib
    import json

    cfg = config()
    before = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "fused"}  # the config as it was
    payload = {"caller": "f", "config": before, "world": 1, "format": training.CHECKPOINT_FORMAT}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert training.full_fingerprint("f", cfg, 1) == expected
    assert training.full_fingerprint("f", config(fused=True), 1) != expected
    optimizer, _ = training.build_optimizer(regression_model(), config(fused=True))
    assert optimizer.defaults["fused"] is True
    optimizer, _ = training.build_optimizer(regression_model(), cfg)
    assert not optimizer.defaults["fused"]
