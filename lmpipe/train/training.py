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
Its sha256 sits beside it (`checkpoint.pt.sha256`); a checkpoint whose bytes do not match
(truncated, bit-flipped, or without a hash) is logged in one line and training starts clean.
A resumed run yields byte-identical weights to an uninterrupted one on the same machine; a
finished run's checkpoint makes a rerun return at once with the same result. SIGTERM (a kill
from DVC, torchrun or a scheduler) ends training at the next step boundary with a checkpoint
of that step, then raises lmpipe.core.errors.Terminated (the stage's run is marked KILLED); a
second SIGTERM, or SIGKILL, stops at once and the last periodic checkpoint is the resume point.

On return the model holds `TrainResult.state`: the best evaluated weights when early stopping
is configured, else the final weights.
"""

from __future__ import annotations

import contextlib
import csv
import functools
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from lmpipe.core.errors import LmpipeError, Terminated
from lmpipe.core.io import atomic_file, write_text
from lmpipe.core.lineage import file_sha256
from lmpipe.train import allocator, distributed, flops

log = logging.getLogger("lmpipe.train.training")

CHECKPOINT_FILE = "checkpoint.pt"
FINISHED_FILE = "finished.json"
HASH_SUFFIX = ".sha256"  # checkpoint.pt.sha256, in `sha256sum` format, written after each checkpoint
CHECKPOINT_FORMAT = 2  # 2: the loop state stored whole (LoopState); format 1 checkpoints are not resumed
TRAIN_COLUMNS = ("step", "loss", "lr", "grad_norm")  # train_curve.csv: the same bytes on every rerun
PERF_COLUMNS = ("step", "tokens_per_s", "mfu")  # perf_curve.csv: what the machine decides

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], "tuple[torch.Tensor, int | torch.Tensor]"]
BatchAt = Callable[[int, int, int, int], Batch]
Evaluate = Callable[[torch.nn.Module], Mapping[str, float]]
# `backward_pass(weight)` forwards a micro-batch, backpropagates loss x weight / grad_accum (gradients
# accumulate) and returns (loss, n_tokens); `adversarial(backward_pass)` runs a micro-batch's passes
# itself and returns the clean pass's (loss, n_tokens) (lmpipe.train.adversarial.FGM). Under DDP each
# pass of the last micro-batch all-reduces the gradients accumulated so far: the same mean, one more
# all-reduce per extra pass.
BackwardPass = Callable[[float], "tuple[torch.Tensor, int | torch.Tensor]"]
Adversarial = Callable[[BackwardPass], "tuple[torch.Tensor, int | torch.Tensor]"]


class MetricSink(Protocol):
    """What the loop needs of a tracker (lmpipe.core.tracking.Tracker fits)."""

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
    it (lmpipe.finetune.finetuning.layer_lr_scales)."""
    early_stopping_metric: str | None = None
    """A key of evaluate()'s dict (e.g. "val_loss"); None = no early stopping, keep the final weights."""
    higher_is_better: bool = False
    """Direction of early_stopping_metric (False for a loss, True for an accuracy)."""
    patience: int | None = None
    """Stop after this many evaluations without improvement; None = never stop early
    (the best evaluated weights are still returned when early_stopping_metric is set)."""
    fused: bool = False
    """AdamW's fused kernel (`torch.optim.AdamW(fused=True)`, CPU and CUDA): one pass over each
    tensor instead of a dozen elementwise ops, ~10x faster on CPU (1.5M params: 2.3 ms vs 22-29 ms
    per step, 1 thread). The same update in another rounding order, so the weights differ in the
    last bits from the default (for-loop) AdamW; deterministic run to run. Off: outputs stay
    byte-identical to runs made before the option existed."""

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
    """{"train": rows of TRAIN_COLUMNS + PERF_COLUMNS, "eval": rows of step + evaluate() keys}; resumes included."""


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


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr_scales: tuple[tuple[str, float], ...] = ()
) -> list[dict[str, Any]]:
    """AdamW groups over the parameters that require grad: [decayed, not decayed] at lr x 1,
    then one such pair per other lr multiplier of `lr_scales` (each group carries `lr_scale`)."""
    groups: dict[tuple[float, bool], list[torch.Tensor]] = {(1.0, False): [], (1.0, True): []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((lr_scale(name, lr_scales), no_decay(name, param)), []).append(param)
    if not any(groups.values()):
        raise LmpipeError("training: the model has no parameter that requires grad")
    return [
        {"params": params, "weight_decay": 0.0 if kept else weight_decay, "lr_scale": scale}
        for (scale, kept), params in groups.items()
        if params or scale == 1.0
    ]


def build_optimizer(
    model: torch.nn.Module, config: TrainConfig
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over trainable params (decay groups as `param_groups`) and its warmup+cosine schedule."""
    groups = param_groups(model, config.weight_decay, config.lr_scales)
    for group in groups:
        group["lr"] = config.lr * group["lr_scale"]
    fused = {"fused": True} if config.fused else {}  # off: torch's default implementation, as before
    optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), **fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    return optimizer, scheduler


def shard_index(micro: int, rank: int, world: int) -> int:
    """Global micro-batch number of (micro, rank): micro * world + rank.

    With it, (grad_accum=2, world=1) and (grad_accum=1, world=2) see the same global batch.
    """
    return micro * world + rank


def full_fingerprint(fingerprint: str, config: TrainConfig, world_size: int) -> str:
    """The caller's fingerprint + the loop config + world size, hashed."""
    loop = asdict(config)
    if not loop["fused"]:
        del loop["fused"]  # added later: off keeps the fingerprints of checkpoints written before it
    payload = json.dumps(
        {"caller": fingerprint, "config": loop, "world": world_size, "format": CHECKPOINT_FORMAT},
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
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
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
    """The checkpoint in `checkpoint_dir` if it is intact and its fingerprint matches, else None.

    Intact: its sha256 equals the one in `checkpoint.pt.sha256` (written after it by `_Run.save`),
    checked before `torch.load`, so a truncated or bit-flipped file (a full disk, a bad copy) is
    never unpickled nor resumed from. A rejected checkpoint is logged in one line (unless quiet)
    and training starts clean; the file is overwritten at the next checkpoint.
    """
    if checkpoint_dir is None:
        return None
    path = Path(checkpoint_dir) / CHECKPOINT_FILE
    if not path.exists():
        return None
    problem = checkpoint_problem(path)
    if problem is None:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # intact bytes that still do not load (another torch, another format)
            problem = f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    if problem is not None:
        if not quiet:
            log.warning("ignoring checkpoint %s: %s; training starts from step 0", path, problem)
        return None
    if state.get("fingerprint") != fingerprint:
        if not quiet:
            log.info("ignoring checkpoint %s: it belongs to another configuration or input", path)
        return None
    return state


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be trusted (no hash, or another hash), or None."""
    hash_path = path.with_name(path.name + HASH_SUFFIX)
    try:
        expected = hash_path.read_text(encoding="utf-8").split()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return f"its hash file {hash_path.name} is missing or empty (a checkpoint written without one)"
    actual = file_sha256(path)
    if actual != expected:
        return f"its sha256 {actual[:16]}... differs from {hash_path.name} ({expected[:16]}...): truncated or corrupt"
    return None


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
    (folder / (CHECKPOINT_FILE + HASH_SUFFIX)).unlink(missing_ok=True)


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


# --------------------------------------------------------------------------- loop state
def _new_window() -> dict[str, float]:
    """Running sums of one log window (this rank's): losses, steps, tokens, seconds, last grad norm."""
    return {"loss": 0.0, "steps": 0.0, "tokens": 0.0, "seconds": 0.0, "grad_norm": 0.0}


@dataclass
class LoopState:
    """Everything that changes while training, besides the model, optimizer and scheduler.

    A checkpoint stores it whole (`to_checkpoint`) and a resume restores it whole
    (`from_checkpoint`); `window` and the RNG states are per rank, kept under `ranks`.
    """

    step: int = 0
    """Optimizer steps completed."""
    best_state: dict[str, torch.Tensor] | None = None
    """CPU weights at best_step (early stopping only)."""
    best_value: float | None = None
    """The early-stopping metric at best_step."""
    best_step: int = 0
    best_metrics: dict[str, float] = field(default_factory=dict)
    last_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    """Evaluations since the last improvement."""
    stopped: bool = False
    """Patience ran out."""
    done: bool = False
    """Training is over (stopped or max_steps reached): a rerun returns at once."""
    train_rows: list[dict[str, float]] = field(default_factory=list)
    eval_rows: list[dict[str, float]] = field(default_factory=list)
    tokens_run: float = 0.0
    """Training tokens over all ranks, resumes included."""
    train_seconds: float = 0.0
    """Wall time of training steps only, resumes included."""
    window: dict[str, float] = field(default_factory=_new_window)

    SHARED = (
        "step",
        "best_state",
        "best_value",
        "best_step",
        "best_metrics",
        "last_metrics",
        "bad_evals",
        "stopped",
        "done",
        "train_rows",
        "eval_rows",
        "tokens_run",
        "train_seconds",
    )

    def to_checkpoint(self) -> dict[str, Any]:
        """The fields every rank shares (the window travels per rank)."""
        return {name: getattr(self, name) for name in self.SHARED}

    @classmethod
    def from_checkpoint(cls, payload: dict[str, Any], rank: int) -> "LoopState":
        """The state a checkpoint holds, with this rank's log window; its RNG states are restored."""
        state = cls(**{name: payload[name] for name in cls.SHARED})
        state.train_rows = [dict(r) for r in state.train_rows]
        state.eval_rows = [dict(r) for r in state.eval_rows]
        state.window = {k: float(v) for k, v in payload["ranks"][rank]["window"].items()}
        _set_rng_state(payload["ranks"][rank]["rng"])
        return state


@dataclass
class _Run:
    """The fixed parts of one training run: what is trained, how, where, and who reports."""

    model: torch.nn.Module
    ddp_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    config: TrainConfig
    device: torch.device
    info: Any
    precision: str
    loss_fn: LossFn
    batch_at: BatchAt
    evaluate: Evaluate
    checkpoint_dir: Path | None
    fingerprint: str
    tracker: MetricSink | None
    flops_per_token: float | None
    peak_flops: float | None
    desc: str
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    """The parameters that require grad (clipped every step), listed once."""
    adversarial: Adversarial | None = None
    """Runs each micro-batch's passes itself (e.g. lmpipe.train.adversarial.FGM); None = one plain pass."""
    step_hook: Any = None
    """Called with the 0-based step after each optimizer step, before the gradients are cleared;
    its state_dict(), if any, is checkpointed (AdaLoRA's rank allocator)."""

    @classmethod
    def start(
        cls,
        model: torch.nn.Module,
        config: TrainConfig,
        device: torch.device,
        *,
        checkpoint_dir: str | Path | None,
        fingerprint: str,
        tracker: MetricSink | None,
        **rest: Any,
    ) -> "_Run":
        """Join the process group (under torchrun), move the model, build the optimizer and schedule."""
        allocator.keep_freed_memory()  # activations reused, not page-faulted in again every step
        info, device = distributed.init_from_env(device)
        model.to(device)
        optimizer, scheduler = build_optimizer(model, config)
        return cls(
            model=model,
            ddp_model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            config=config,
            device=device,
            info=info,
            precision=resolve_precision(config.precision, device),
            checkpoint_dir=Path(checkpoint_dir) if checkpoint_dir is not None else None,
            fingerprint=full_fingerprint(fingerprint, config, info.world_size),
            tracker=tracker if info.is_main else None,
            trainable=[p for p in model.parameters() if p.requires_grad],
            **rest,
        )

    def progress_bar(self, initial: int) -> Any:
        """A tqdm bar on rank 0 when stderr is a terminal (log lines otherwise)."""
        return tqdm(
            total=self.config.max_steps,
            initial=initial,
            desc=self.desc,
            unit="step",
            dynamic_ncols=True,
            disable=not (self.info.is_main and sys.stderr.isatty()),
        )

    def due(self, step: int, every: int) -> bool:
        return step % every == 0 or step == self.config.max_steps

    def resume(self) -> LoopState:
        """The checkpoint's state (model, optimizer and scheduler loaded too), or a fresh one."""
        ckpt = load_checkpoint(self.checkpoint_dir, self.fingerprint, quiet=not self.info.is_main)
        if ckpt is None:
            return LoopState()
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "step_hook" in ckpt:
            self.step_hook.load_state_dict(ckpt["step_hook"])
        state = LoopState.from_checkpoint(ckpt, self.info.rank)
        if self.info.is_main:
            log.info("resuming from %s at step %d", self.checkpoint_dir / CHECKPOINT_FILE, state.step)
        return state

    def backward_pass(self, batch: Batch, weight: float) -> tuple[torch.Tensor, int | torch.Tensor]:
        """Forward one micro-batch and backpropagate loss x weight / grad_accum (gradients accumulate)."""
        with autocast(self.precision, self.device):
            loss, n_tokens = self.loss_fn(self.ddp_model, batch)
        (loss / self.config.grad_accum if weight == 1.0 else loss * weight / self.config.grad_accum).backward()
        return loss, n_tokens

    def optimizer_step(self, state: LoopState) -> None:
        """One optimizer step over grad_accum micro-batches; its figures go into the log window."""
        cfg, info, t0 = self.config, self.info, time.perf_counter()
        loss_sum, tokens = 0.0, 0
        for micro in range(cfg.grad_accum):
            batch = _to_device(self.batch_at(state.step, micro, info.rank, info.world_size), self.device)
            last_micro = micro == cfg.grad_accum - 1
            with _nothing() if last_micro or not info.enabled else self.ddp_model.no_sync():
                passes = functools.partial(self.backward_pass, batch)
                loss, n_tokens = self.adversarial(passes) if self.adversarial is not None else passes(1.0)
            loss_sum += float(loss.detach())
            tokens += int(n_tokens)
        max_norm = cfg.clip_norm if cfg.clip_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, max_norm))
        state.window["lr"] = self.optimizer.param_groups[0]["lr"]  # the lr this step used
        self.optimizer.step()
        if self.step_hook is not None:
            self.step_hook(state.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        state.step += 1
        step_loss = loss_sum / cfg.grad_accum
        if not math.isfinite(step_loss):
            raise LmpipeError(
                f"training diverged at step {state.step}: loss is {step_loss} (lower the lr or enable clip_norm)"
            )
        for key, value in (("loss", step_loss), ("steps", 1), ("tokens", tokens), ("seconds", seconds)):
            state.window[key] += value
        state.window["grad_norm"] = grad_norm
        state.train_seconds += seconds

    def log_window(self, state: LoopState) -> dict[str, float]:
        """A train-curve row from the log window (summed over ranks), to the tracker; the window restarts."""
        window, world = state.window, self.info.world_size
        loss_g, tokens_g = distributed.all_reduce_sum([window["loss"], window["tokens"]], self.device)
        mean_loss = loss_g / (window["steps"] * world)
        tps = tokens_g / max(window["seconds"], 1e-9)
        state.tokens_run += tokens_g
        mfu = flops.mfu(tps, self.flops_per_token, self.peak_flops, world)
        row = {
            "step": state.step,
            "loss": mean_loss,
            "lr": window["lr"],
            "grad_norm": window["grad_norm"],
            "tokens_per_s": tps,
            "mfu": mfu if mfu is not None else float("nan"),
        }
        state.train_rows.append(row)
        if self.tracker is not None:
            self.tracker.log_metrics(
                {
                    "train_loss": mean_loss,
                    "lr": row["lr"],
                    "grad_norm": row["grad_norm"],
                    "tokens_per_s": tps,
                    **({"mfu": mfu} if mfu is not None else {}),
                },
                step=state.step,
            )
        if self.info.is_main and not sys.stderr.isatty():
            eta = (self.config.max_steps - state.step) * window["seconds"] / window["steps"]
            log.info(
                "%s step %d/%d loss %.4f lr %.3g grad_norm %.3g tokens/s %.0f ETA %.0fs",
                self.desc,
                state.step,
                self.config.max_steps,
                mean_loss,
                row["lr"],
                row["grad_norm"],
                tps,
                eta,
            )
        state.window = _new_window()
        return row

    def run_eval(self, state: LoopState) -> None:
        """evaluate() on rank 0, broadcast, tracked; keep the best weights; count patience."""
        self.model.eval()
        metrics: dict[str, float] | None = None
        if self.info.is_main:
            with torch.no_grad(), autocast(self.precision, self.device):
                metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
        state.last_metrics = distributed.broadcast(metrics)
        self.model.train()
        if self.tracker is not None:
            self.tracker.log_metrics(state.last_metrics, step=state.step)
        state.eval_rows.append({"step": state.step, **state.last_metrics})
        if self.info.is_main:
            log.info(
                "%s eval at step %d: %s",
                self.desc,
                state.step,
                ", ".join(f"{k} {v:.4f}" for k, v in sorted(state.last_metrics.items())),
            )
        if self.config.early_stopping_metric is not None:
            self.track_best(state)

    def track_best(self, state: LoopState) -> None:
        """Early stopping: keep the best evaluated weights; stop once patience runs out."""
        cfg, metric = self.config, self.config.early_stopping_metric
        if metric not in state.last_metrics:
            raise LmpipeError(
                f"early stopping metric {metric!r} is not one of {sorted(state.last_metrics)} returned by evaluate()"
            )
        value = state.last_metrics[metric]
        if state.best_value is None or (value > state.best_value if cfg.higher_is_better else value < state.best_value):
            state.best_value, state.best_step, state.best_metrics = value, state.step, dict(state.last_metrics)
            state.best_state = cpu_state(self.model)
            state.bad_evals = 0
        else:
            state.bad_evals += 1
            state.stopped = cfg.patience is not None and state.bad_evals >= cfg.patience
        if state.stopped and self.info.is_main:
            log.info("%s: early stop at step %d (best %s at step %d)", self.desc, state.step, metric, state.best_step)

    def save(self, state: LoopState) -> None:
        """Checkpoint the run (rank 0 writes it, atomically, with every rank's RNG states and window)."""
        ranks = distributed.all_gather({"rng": _rng_state(), "window": dict(state.window)})
        if self.checkpoint_dir is None or not self.info.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "ranks": ranks,
            **state.to_checkpoint(),
            **({"step_hook": self.step_hook.state_dict()} if hasattr(self.step_hook, "state_dict") else {}),
        }
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        path = self.checkpoint_dir / CHECKPOINT_FILE
        with atomic_file(path) as tmp:
            torch.save(payload, tmp)
            digest = file_sha256(tmp)
        # after the checkpoint: a kill in between leaves a mismatch, read as "start clean", never garbage
        write_text(path.with_name(path.name + HASH_SUFFIX), f"{digest}  {path.name}\n")

    def result(
        self, state: LoopState, resumed_from: int, curves_dir: str | Path | None, perf_curve: str | Path | None
    ) -> TrainResult:
        """Load the weights to return, write the curves (rank 0), and sum the run up."""
        if self.config.early_stopping_metric is None or state.best_state is None:
            state.best_state, state.best_step = cpu_state(self.model), state.step
            state.best_metrics = dict(state.last_metrics)
        self.model.load_state_dict(state.best_state)
        if curves_dir is not None and self.info.is_main:
            write_curve(Path(curves_dir) / "train_curve.csv", state.train_rows, TRAIN_COLUMNS)
            eval_cols = ["step", *sorted({k for r in state.eval_rows for k in r if k != "step"})]
            write_curve(Path(curves_dir) / "eval_curve.csv", state.eval_rows, eval_cols)
        if perf_curve is not None and self.info.is_main:
            write_curve(Path(perf_curve), state.train_rows, PERF_COLUMNS)
        if self.tracker is not None and hasattr(self.tracker, "flush"):
            self.tracker.flush()
        tps_all = state.tokens_run / state.train_seconds if state.train_seconds > 0 else float("nan")
        return TrainResult(
            state=state.best_state,
            best_step=state.best_step,
            best_metrics=state.best_metrics,
            final_metrics=dict(state.last_metrics),
            steps=state.step,
            stopped_early=state.stopped,
            resumed_from=resumed_from,
            tokens_per_s=tps_all,
            mfu=flops.mfu(tps_all, self.flops_per_token, self.peak_flops, self.info.world_size),
            train_seconds=state.train_seconds,
            history={"train": state.train_rows, "eval": state.eval_rows},
        )


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
    perf_curve: str | Path | None = None,
    desc: str = "train",
    adversarial: Adversarial | None = None,
    step_hook: Any = None,
) -> TrainResult:
    """Train `model` in place; see the module docstring for the contract of each callable.

    model: already built and seeded identically on every rank; moved to `device` here.
    checkpoint_dir: where `checkpoint.pt` lives (None = no checkpoints, no resume).
    fingerprint: the caller's hash of everything that defines the run besides `config`.
    tracker: gets train_loss, lr, grad_norm, tokens_per_s, mfu every log_every steps and the
        evaluate() metrics at each evaluation (rank 0 only).
    flops_per_token, peak_flops: training FLOPs per token (lmpipe.train.flops) and the device's
        peak FLOP/s; MFU is None unless both are given.
    curves_dir: rank 0 writes `train_curve.csv` (TRAIN_COLUMNS) and `eval_curve.csv`
        (step + sorted evaluate() keys) there at the end.
    perf_curve: rank 0 writes PERF_COLUMNS (tokens/s, MFU) to this CSV, apart from the curves, which repeat.
    adversarial, step_hook: optional hooks, see `Adversarial` and `_Run.step_hook` (AdaLoRA); None = unused.
    """
    run = _Run.start(
        model,
        config,
        device,
        loss_fn=loss_fn,
        batch_at=batch_at,
        evaluate=evaluate,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint,
        tracker=tracker,
        flops_per_token=flops_per_token,
        peak_flops=peak_flops,
        desc=desc,
        adversarial=adversarial,
        step_hook=step_hook,
    )
    state = run.resume()
    resumed_from = state.step
    run.ddp_model = distributed.wrap(model, run.device)
    bar = run.progress_bar(state.step)
    model.train()
    term = _DeferredTerm()
    try:
        while not state.done and state.step < config.max_steps:
            # ---- one optimizer step (grad_accum micro-batches)
            run.optimizer_step(state)
            bar.update(1)
            # ---- a train-curve row every log_every steps
            if run.due(state.step, config.log_every):
                row = run.log_window(state)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}", refresh=False)
            # ---- evaluation, best weights, early stopping
            if run.due(state.step, config.eval_every):
                run.run_eval(state)
            # ---- checkpoint; a SIGTERM ends the run here, resumable
            state.done = state.stopped or state.step == config.max_steps
            saved = run.due(state.step, config.checkpoint_every) or state.done
            if saved:
                run.save(state)
            if not state.done and term.requested(run.info.enabled, run.device):
                if not saved:
                    run.save(state)
                raise Terminated(f"signal {term.signum}: checkpoint at step {state.step}, rerun to resume")
    finally:
        term.restore()
        bar.close()
    return run.result(state, resumed_from, curves_dir, perf_curve)
