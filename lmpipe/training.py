"""The one training loop, shared by pretraining and fine-tuning.

`train(model, loss_fn=..., batch_at=..., evaluate=..., config=..., ...)` runs AdamW with linear
warmup then cosine decay, gradient accumulation, global-norm clipping, bf16 autocast where the
device supports it, periodic evaluation with early stopping, atomic checkpoints that a rerun
resumes from exactly, and DDP under `torchrun`. What it trains is up to the caller:

- `batch_at(step, micro, rank, world) -> dict[str, Tensor]` (CPU tensors) is a PURE function of
  its arguments: the micro-batch `micro` (0..grad_accum-1) of optimizer step `step` (0-based)
  for process `rank` of `world`. The global batch of a step is the union over (micro, rank).
  Because no data-loader state exists, a resumed run sees exactly the batches the
  uninterrupted run saw, and DDP sharding is just "rank r takes its own shard". A caller that
  wants a single process with grad_accum=2 to equal 2 processes with grad_accum=1 numbers
  shards `shard = micro * world + rank` (see `shard_index`).
- `loss_fn(model, batch) -> (loss, n_tokens)`: `loss` is the mean loss of that micro-batch (a
  0-dim tensor), `n_tokens` the tokens it processed (for tokens/s). `model` is the module being
  trained, wrapped in DistributedDataParallel when distributed: CALL it (its forward), never its
  submodules, or DDP cannot synchronise gradients. The batch has already been moved to the
  device.
- `evaluate(model) -> dict[str, float]` runs every `eval_every` steps and after the last one,
  on RANK 0 ONLY, with the unwrapped model in eval mode under `torch.no_grad()` and the training
  autocast; its dict is broadcast so every rank takes the same early-stopping decision.

The micro-batch losses are averaged (loss / grad_accum, and DDP averages over ranks), i.e. the
step loss is the mean of the micro-batch means.

Semantics of steps: `step` in `batch_at` is the 0-based index of the optimizer step being
computed; logged steps, `eval_every`, `checkpoint_every`, `best_step` and `TrainResult.steps`
count completed optimizer steps (1..max_steps).

Checkpoints (`<checkpoint_dir>/checkpoint.pt`, written atomically by rank 0 every
`checkpoint_every` steps and at the end) hold the model, optimizer, scheduler, every rank's RNG
states (torch, numpy, python, cuda) and partial log window, the step, the best state and metric, the patience
counter, the curve rows so far and a fingerprint. The fingerprint is the caller's `fingerprint`
(a hash of its params and inputs) combined with the TrainConfig and world size: a checkpoint
with another fingerprint is ignored (and overwritten at the next checkpoint), never resumed.
A resumed run yields byte-identical weights to an uninterrupted one on the same machine; a
finished run's checkpoint makes a rerun return at once with the same result. SIGTERM (a kill
from DVC, torchrun or a scheduler) ends training at the next step boundary with a checkpoint
of that step, then raises lmpipe.tracking.Terminated (the stage's run is marked KILLED); a
second SIGTERM, or SIGKILL, stops at once and the last periodic checkpoint is the resume point.

On return the model holds `TrainResult.state`: the best evaluated weights when early stopping
is configured, else the final weights.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import random
import re
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol

import numpy as np
import torch
from tqdm import tqdm

from lmpipe import distributed, flops
from lmpipe.errors import LmpipeError
from lmpipe.io import atomic_file
from lmpipe.tracking import Terminated

log = logging.getLogger("lmpipe.training")

CHECKPOINT_FILE = "checkpoint.pt"
FINISHED_FILE = "finished.json"
CHECKPOINT_FORMAT = 1
TRAIN_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu")

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, int | torch.Tensor]"]
BatchAt = Callable[[int, int, int, int], Batch]
Evaluate = Callable[[torch.nn.Module], Mapping[str, float]]


class MetricSink(Protocol):
    """What the loop needs of a tracker (lmpipe.tracking.Tracker fits)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...


@dataclass(frozen=True)
class TrainConfig:
    """Everything that shapes the optimisation (part of the checkpoint fingerprint)."""

    max_steps: int
    """Optimizer steps to run (early stopping may end sooner)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (per process)."""
    lr: float = 5e-4
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay; biases, norm weights and other 1-d params get none."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = 0
    """Linear warmup over this many optimizer steps (see `lr_factor`)."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at lr * min_lr_ratio at the last step."""
    clip_norm: float | None = 1.0
    """Global gradient-norm clip; None = no clipping (the norm is still logged)."""
    eval_every: int = 50
    """Evaluate every this many completed steps (and after the last)."""
    checkpoint_every: int = 50
    """Checkpoint every this many completed steps (and after the last)."""
    log_every: int = 10
    """Log a train-curve row every this many completed steps (and after the last)."""
    precision: str = "auto"
    """auto | fp32 | bf16: auto = bf16 autocast on CUDA with bf16 support, fp32 elsewhere."""
    lr_scales: tuple[tuple[str, float], ...] = ()
    """(regex, multiplier) pairs: a parameter whose name matches a regex (re.search; the first
    match wins) trains at lr x multiplier, the others at lr. Layer-wise lr decay is built from
    it (lmpipe.finetuning.layer_lr_scales)."""
    early_stopping_metric: str | None = None
    """A key of evaluate()'s dict (e.g. "val_loss"); None = no early stopping, keep the final weights."""
    higher_is_better: bool = False
    """Direction of early_stopping_metric (False for a loss, True for an accuracy)."""
    patience: int | None = None
    """Stop after this many evaluations without improvement; None = never stop early
    (the best evaluated weights are still returned when early_stopping_metric is set)."""

    def __post_init__(self) -> None:
        checks = {
            "max_steps": self.max_steps >= 1,
            "grad_accum": self.grad_accum >= 1,
            "lr": self.lr > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "eval_every": self.eval_every >= 1,
            "checkpoint_every": self.checkpoint_every >= 1,
            "log_every": self.log_every >= 1,
            "precision": self.precision in ("auto", "fp32", "bf16"),
            "patience": self.patience is None or self.patience >= 1,
            "clip_norm": self.clip_norm is None or self.clip_norm > 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"TrainConfig: bad value for {bad[0]} ({getattr(self, bad[0])!r})")


@dataclass
class TrainResult:
    """What a training run produced (identical on every rank except the timing figures)."""

    state: dict[str, torch.Tensor]
    """Best weights (early stopping) or final weights, on the CPU; also loaded into the model."""
    best_step: int
    """Step whose weights `state` holds."""
    best_metrics: dict[str, float]
    """evaluate() at best_step."""
    final_metrics: dict[str, float]
    """evaluate() after the last step run."""
    steps: int
    """Optimizer steps completed (including those before a resume)."""
    stopped_early: bool
    """True when patience ran out before max_steps."""
    resumed_from: int
    """Step of the checkpoint this run resumed from (0 = fresh start)."""
    tokens_per_s: float
    """Training tokens per second over all ranks, over every step of the run (resumes included)."""
    mfu: float | None
    """Model FLOPs utilisation (tokens/s x flops_per_token / (peak_flops x world)); None if unknown."""
    train_seconds: float
    """Wall time of the training steps (evaluation and checkpoints excluded; resumes included)."""
    history: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    """{"train": rows of TRAIN_COLUMNS, "eval": rows of step + evaluate() keys}, resumed rows included."""


# --------------------------------------------------------------------------- building blocks
def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 on CUDA with bf16 support, fp32 elsewhere; explicit choices pass through."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    return precision


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast when precision is bf16, else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of config.lr for 0-based optimizer step `step`.

    Warmup: (step + 1) / (warmup_steps + 1) for step < warmup_steps (never 0, reaches the peak
    at step = warmup_steps). Then cosine from 1 at step = warmup_steps to min_lr_ratio at the
    last step (max_steps - 1).
    """
    if step < config.warmup_steps:
        return (step + 1) / (config.warmup_steps + 1)
    span = max(1, config.max_steps - 1 - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and every other 1-d parameter get no weight decay."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered


def lr_scale(name: str, lr_scales: tuple[tuple[str, float], ...]) -> float:
    """The lr multiplier of parameter `name`: the first matching (regex, multiplier), else 1."""
    return next((float(scale) for pattern, scale in lr_scales if re.search(pattern, name)), 1.0)


def param_groups(model: torch.nn.Module, weight_decay: float,
                 lr_scales: tuple[tuple[str, float], ...] = ()) -> list[dict[str, Any]]:
    """AdamW groups over the parameters that require grad: [decayed, not decayed] at lr x 1,
    then one such pair per other lr multiplier of `lr_scales` (each group carries `lr_scale`)."""
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {(1.0, False): [], (1.0, True): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((lr_scale(name, lr_scales), no_decay(name, param)), []).append(param)
    if not any(groups.values()):
        raise LmpipeError("training: the model has no parameter that requires grad")
    return [{"params": params, "weight_decay": 0.0 if kept else weight_decay, "lr_scale": scale}
            for (scale, kept), params in groups.items() if params or scale == 1.0]


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable params (decay groups as `param_groups`) and its warmup+cosine schedule."""
    groups = param_groups(model, config.weight_decay, config.lr_scales)
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    return optimizer, scheduler


def shard_index(micro: int, rank: int, world: int) -> int:
    """Global micro-batch number of (micro, rank): micro * world + rank.

    With it, (grad_accum=2, world=1) and (grad_accum=1, world=2) see the same global batch.
    """
    return micro * world + rank


def full_fingerprint(fingerprint: str, config: TrainConfig, world_size: int) -> str:
    """The caller's fingerprint + the loop config + world size, hashed."""
    payload = json.dumps(
        {"caller": fingerprint, "config": asdict(config), "world": world_size, "format": CHECKPOINT_FORMAT},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of a module's state dict."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def write_curve(path: Path, rows: list[dict[str, float]], columns: list[str] | tuple[str, ...]) -> None:
    """Write a CSV curve with a header row, atomically (the format `dvc plots` reads)."""
    with atomic_file(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt(row.get(c, float("nan"))) for c in columns])


def _fmt(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{float(value):.6g}"


# --------------------------------------------------------------------------- checkpoints
def load_checkpoint(checkpoint_dir: Path | None, fingerprint: str, quiet: bool = False) -> dict[str, Any] | None:
    """The checkpoint in `checkpoint_dir` if its fingerprint matches, else None (logged unless quiet)."""
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable: treat as absent; it is overwritten at the next checkpoint
        if not quiet:
            log.warning("ignoring unreadable checkpoint %s (%s)", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        if not quiet:
            log.info("ignoring checkpoint %s: it belongs to another configuration or input", path)
        return None
    return state


def finish_checkpoint(checkpoint_dir: str | Path, steps: int) -> None:
    """After the stage's outputs are written, shrink the resume point to a small marker.

    The checkpoint folder is a DVC output (persist: true) that is cached and pushed like any
    other, so a fresh clone plus `dvc pull` finds nothing to rerun; keeping the full state
    (weights, optimizer moments, best weights: ~4x the model) in every cache version would
    cost far more than the resume it allows after success. A forced rerun then trains from
    the start, which yields the same bytes.
    """
    folder = Path(checkpoint_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(folder / FINISHED_FILE) as tmp:
        tmp.write_text(json.dumps({"finished": True, "steps": int(steps)}, sort_keys=True) + "\n")
    (folder / CHECKPOINT_FILE).unlink(missing_ok=True)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


class _DeferredTerm:
    """SIGTERM during training ends the run at the next step boundary, after a checkpoint.

    The first SIGTERM only sets a flag (so the optimizer step in flight completes and the
    checkpoint is consistent); a second one raises at once. Under DDP the flag is summed over
    ranks every step so all ranks stop at the same step. Only installed in the main thread.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise Terminated(f"signal {signum}")
        self.signum = signum

    def requested(self, distributed_run: bool, device: torch.device) -> bool:
        if distributed_run:
            return distributed.all_reduce_sum([float(self.signum is not None)], device)[0] > 0
        return self.signum is not None

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --------------------------------------------------------------------------- the loop
def train(
    model: torch.nn.Module,
    *,
    loss_fn: LossFn,
    batch_at: BatchAt,
    evaluate: Evaluate,
    config: TrainConfig,
    device: torch.device,
    checkpoint_dir: str | Path | None = None,
    fingerprint: str = "",
    tracker: MetricSink | None = None,
    flops_per_token: float | None = None,
    peak_flops: float | None = None,
    curves_dir: str | Path | None = None,
    desc: str = "train",
) -> TrainResult:
    """Train `model` in place; see the module docstring for the contract of each callable.

    model: already built and seeded identically on every rank; moved to `device` here.
    checkpoint_dir: where `checkpoint.pt` lives (None = no checkpoints, no resume).
    fingerprint: the caller's hash of everything that defines the run besides `config`.
    tracker: gets train_loss, lr, grad_norm, tokens_per_s, mfu every log_every steps and the
        evaluate() metrics at each evaluation (rank 0 only).
    flops_per_token, peak_flops: training FLOPs per token (lmpipe.flops) and the device's
        peak FLOP/s; MFU is None unless both are given.
    curves_dir: rank 0 writes `train_curve.csv` (TRAIN_COLUMNS) and `eval_curve.csv`
        (step + sorted evaluate() keys) there at the end.
    """
    info, device = distributed.init_from_env(device)
    precision = resolve_precision(config.precision, device)
    fp = full_fingerprint(fingerprint, config, info.world_size)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    model.to(device)
    optimizer, scheduler = build_optimizer(model, config)

    # ---- state that a checkpoint carries
    start = 0
    best_state: dict[str, torch.Tensor] | None = None
    best_value: float | None = None
    best_step = 0
    best_metrics: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    bad_evals = 0
    stopped = False
    done = False
    train_rows: list[dict[str, float]] = []
    eval_rows: list[dict[str, float]] = []
    tokens_run, train_seconds = 0.0, 0.0
    resumed_window: dict[str, float] | None = None

    ckpt = load_checkpoint(checkpoint_dir, fp, quiet=not info.is_main)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start = int(ckpt["step"])
        best_state = ckpt["best_state"]
        best_value = ckpt["best_value"]
        best_step = int(ckpt["best_step"])
        best_metrics = dict(ckpt["best_metrics"])
        last_metrics = dict(ckpt["last_metrics"])
        bad_evals = int(ckpt["bad_evals"])
        stopped = bool(ckpt["stopped"])
        done = bool(ckpt["done"])
        train_rows = [dict(r) for r in ckpt["train_rows"]]
        eval_rows = [dict(r) for r in ckpt["eval_rows"]]
        tokens_run, train_seconds = (float(x) for x in ckpt["totals"])
        resumed_window = {k: float(v) for k, v in ckpt["ranks"][info.rank]["window"].items()}
        _set_rng_state(ckpt["ranks"][info.rank]["rng"])
        if info.is_main:
            log.info("resuming from %s at step %d", checkpoint_dir / CHECKPOINT_FILE, start)
        del ckpt
    resumed_from = start

    ddp_model = distributed.wrap(model, device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics_tracker = tracker if (tracker is not None and info.is_main) else None

    def run_eval(step: int) -> dict[str, float]:
        model.eval()
        metrics: dict[str, float] | None = None
        if info.is_main:
            with torch.no_grad(), autocast(precision, device):
                metrics = {k: float(v) for k, v in evaluate(model).items()}
        metrics = distributed.broadcast(metrics)
        model.train()
        if metrics_tracker is not None:
            metrics_tracker.log_metrics(metrics, step=step)
        return metrics

    def save(step: int) -> None:
        ranks = distributed.all_gather({"rng": _rng_state(), "window": dict(window)})
        if checkpoint_dir is None or not info.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": fp,
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "ranks": ranks,
            "best_state": best_state,
            "best_value": best_value,
            "best_step": best_step,
            "best_metrics": best_metrics,
            "last_metrics": last_metrics,
            "bad_evals": bad_evals,
            "stopped": stopped,
            "done": done,
            "train_rows": train_rows,
            "eval_rows": eval_rows,
            "totals": [tokens_run, train_seconds],
        }
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(checkpoint_dir / CHECKPOINT_FILE) as tmp:
            torch.save(payload, tmp)

    # ---- timing: only training steps count (totals carry over a resume)
    window = resumed_window or {"loss": 0.0, "steps": 0.0, "tokens": 0.0, "seconds": 0.0, "grad_norm": 0.0}

    bar = tqdm(
        total=config.max_steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
        disable=not (info.is_main and sys.stderr.isatty()),
    )
    model.train()
    step = start
    term = _DeferredTerm()
    try:
        while not done and step < config.max_steps:
            t0 = time.perf_counter()
            loss_sum = 0.0
            tokens = 0
            for micro in range(config.grad_accum):
                batch = _to_device(batch_at(step, micro, info.rank, info.world_size), device)
                last_micro = micro == config.grad_accum - 1
                sync = _nothing() if last_micro or not info.enabled else ddp_model.no_sync()
                with sync:
                    with autocast(precision, device):
                        loss, n_tokens = loss_fn(ddp_model, batch)
                    (loss / config.grad_accum).backward()
                loss_sum += float(loss.detach())
                tokens += int(n_tokens)
            max_norm = config.clip_norm if config.clip_norm is not None else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, max_norm))
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            step += 1
            step_loss = loss_sum / config.grad_accum
            if not math.isfinite(step_loss):
                raise LmpipeError(
                    f"training diverged at step {step}: loss is {step_loss} (lower the lr or enable clip_norm)"
                )
            window["loss"] += step_loss
            window["steps"] += 1
            window["tokens"] += tokens
            window["seconds"] += seconds
            window["grad_norm"] = grad_norm
            train_seconds += seconds
            bar.update(1)

            if step % config.log_every == 0 or step == config.max_steps:
                loss_g, tokens_g = distributed.all_reduce_sum([window["loss"], window["tokens"]], device)
                mean_loss = loss_g / (window["steps"] * info.world_size)
                tps = tokens_g / max(window["seconds"], 1e-9)
                tokens_run += tokens_g
                mfu = flops.mfu(tps, flops_per_token, peak_flops, info.world_size)
                row = {"step": step, "loss": mean_loss, "lr": lr, "grad_norm": window["grad_norm"],
                       "tokens_per_s": tps, "mfu": mfu if mfu is not None else float("nan")}
                train_rows.append(row)
                if metrics_tracker is not None:
                    metrics_tracker.log_metrics(
                        {"train_loss": mean_loss, "lr": lr, "grad_norm": window["grad_norm"],
                         "tokens_per_s": tps, **({"mfu": mfu} if mfu is not None else {})},
                        step=step,
                    )
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
                if info.is_main and not sys.stderr.isatty():
                    eta = (config.max_steps - step) * window["seconds"] / window["steps"]
                    log.info("%s step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f ETA %.0fs",
                             desc, step, config.max_steps, mean_loss, lr, window["grad_norm"], tps, eta)
                window = {k: 0.0 for k in window}

            if step % config.eval_every == 0 or step == config.max_steps:
                last_metrics = run_eval(step)
                eval_rows.append({"step": step, **last_metrics})
                if info.is_main:
                    log.info("%s eval at step %d: %s", desc, step,
                             ", ".join(f"{k} {v:.4f}" for k, v in sorted(last_metrics.items())))
                if config.early_stopping_metric is not None:
                    if config.early_stopping_metric not in last_metrics:
                        raise LmpipeError(
                            f"early stopping metric {config.early_stopping_metric!r} is not one of "
                            f"{sorted(last_metrics)} returned by evaluate()"
                        )
                    value = last_metrics[config.early_stopping_metric]
                    better = best_value is None or (
                        value > best_value if config.higher_is_better else value < best_value
                    )
                    if better:
                        best_value, best_step, best_metrics = value, step, dict(last_metrics)
                        best_state = cpu_state(model)
                        bad_evals = 0
                    else:
                        bad_evals += 1
                        stopped = config.patience is not None and bad_evals >= config.patience
                if stopped and info.is_main:
                    log.info("%s: early stop at step %d (best %s at step %d)", desc, step,
                             config.early_stopping_metric, best_step)

            finished = stopped or step == config.max_steps
            if finished:
                done = True
            saved = step % config.checkpoint_every == 0 or finished
            if saved:
                save(step)
            if not finished and term.requested(info.enabled, device):
                if not saved:
                    save(step)
                raise Terminated(f"signal {term.signum}: checkpoint at step {step}, rerun to resume")
    finally:
        term.restore()
        bar.close()

    if config.early_stopping_metric is None or best_state is None:
        best_state, best_step, best_metrics = cpu_state(model), step, dict(last_metrics)
    model.load_state_dict(best_state)

    if curves_dir is not None and info.is_main:
        curves = Path(curves_dir)
        write_curve(curves / "train_curve.csv", train_rows, TRAIN_COLUMNS)
        eval_cols = ["step", *sorted({k for r in eval_rows for k in r if k != "step"})]
        write_curve(curves / "eval_curve.csv", eval_rows, eval_cols)
    if metrics_tracker is not None and hasattr(metrics_tracker, "flush"):
        metrics_tracker.flush()

    tps_all = tokens_run / train_seconds if train_seconds > 0 else float("nan")
    return TrainResult(
        state=best_state,
        best_step=best_step,
        best_metrics=best_metrics,
        final_metrics=dict(last_metrics),
        steps=step,
        stopped_early=stopped,
        resumed_from=resumed_from,
        tokens_per_s=tps_all,
        mfu=flops.mfu(tps_all, flops_per_token, peak_flops, info.world_size),
        train_seconds=train_seconds,
        history={"train": train_rows, "eval": eval_rows},
    )
