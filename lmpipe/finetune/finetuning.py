"""Sequence classification on top of a BERT-family backbone: batching, model, the whole run.

Everything `python -m stages.finetune` needs besides the training loop (lmpipe/train), the
splits (lmpipe/task) and the text encoding, classifier folder and inference loop it shares with
evaluate, export and predict (lmpipe/inference).

- Batching: length bucketing. Each epoch is a seeded permutation; within chunks of
  `CHUNK_BATCHES` batches the examples are sorted by length, cut into batches, and the batches
  of the epoch shuffled again. Batches hold examples of similar length, so far fewer pad tokens
  are computed than with random batches, while the order stays random at the chunk level.
  `batch_at(step, micro, rank, world)` is a pure function of (seed, step, micro, rank, world).
- Model: `AutoModelForSequenceClassification` from the backbone folder (offline). The pooler
  (absent from a masked-LM checkpoint) and the classifier are freshly initialised from the
  seed. Modes: `full` (every weight trains), `frozen` (the head = pooler + classifier trains,
  plus the top k encoder layers), `lora` (peft adapters on `target_modules`; the classifier and
  the pooler train in full; merged into the weights before saving), and `adalora`, `prefix`,
  `adapter` (lmpipe.finetune.peft_modes).
- Validation: the shared inference loop (`lmpipe.inference.batched`) and `validation_metrics`.

torch, transformers and peft are imported inside functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import dvc_md5
from lmpipe.finetune import augmentation, peft_modes
from lmpipe.inference.batched import torch_logits
from lmpipe.inference.classifier import encoder_layers, load_tokenizer, quiet_transformers
from lmpipe.inference.encoding import collate, encode_texts
from lmpipe.task.metrics import log_softmax, validation_metrics
from lmpipe.task.splits import check_processed, load_label_names, load_split, stratified_subsample
from lmpipe.train import adversarial

if TYPE_CHECKING:  # pragma: no cover
    pass

log = logging.getLogger("lmpipe.finetune.finetuning")

CHUNK_BATCHES = 50  # batches per sorting chunk: similar lengths per batch, still a random order
EVAL_BATCH = 64  # examples per validation forward pass (length-sorted, so little padding)
PEFT_MODES = ("adalora", "prefix", "adapter")  # lmpipe.finetune.peft_modes


# --------------------------------------------------------------------------- batching
class LengthBuckets:
    """Epochs of length-bucketed batches, each a pure function of (seed, epoch).

    An epoch is `len(lengths) // batch_size` batches (the remainder, different each epoch, is
    left out). Global batch g lives in epoch g // batches_per_epoch.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int,
        chunk_batches: int = CHUNK_BATCHES,
        bucket: bool = True,
    ) -> None:
        if len(lengths) < batch_size:
            raise LmpipeError(f"{len(lengths)} training examples are fewer than one batch of {batch_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.chunk = chunk_batches * batch_size
        self.bucket = bucket
        self.batches_per_epoch = len(lengths) // batch_size
        self._epoch = lru_cache(maxsize=2)(self._plan)

    def _plan(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))[: self.batches_per_epoch * self.batch_size]
        if self.bucket:
            chunks = [order[i : i + self.chunk] for i in range(0, len(order), self.chunk)]
            order = np.concatenate([c[np.argsort(self.lengths[c], kind="stable")] for c in chunks])
        batches = order.reshape(self.batches_per_epoch, self.batch_size)
        return batches[rng.permutation(self.batches_per_epoch)]

    def indices(self, global_batch: int) -> np.ndarray:
        epoch, index = divmod(global_batch, self.batches_per_epoch)
        return self._epoch(epoch)[index]


def make_batch_at(
    encoded: dict[str, list[list[int]]],
    labels: np.ndarray,
    *,
    batch_size: int,
    grad_accum: int,
    seed: int,
    pad_id: int,
    bucket: bool = True,
) -> Callable[[int, int, int, int], dict[str, Any]]:
    """`batch_at(step, micro, rank, world)`: the padded micro-batch a process trains on.

    Global batch number = (step * grad_accum + micro) * world + rank, so every rank and micro
    step reads distinct examples and a resumed run reads exactly what an uninterrupted one would.
    """
    ids = encoded["input_ids"]
    buckets = LengthBuckets([len(x) for x in ids], batch_size, seed, bucket=bucket)

    def batch_at(step: int, micro: int, rank: int, world: int) -> dict[str, Any]:
        rows = buckets.indices((step * grad_accum + micro) * world + rank)
        return collate([ids[i] for i in rows], labels[rows], pad_id)

    batch_at.buckets = buckets  # type: ignore[attr-defined]
    return batch_at


def padding_share(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Share of computed positions that are padding when each batch pads to its longest."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for rows in batches:
        got = lengths[np.asarray(rows)]
        real += int(got.sum())
        padded += int(got.max()) * len(got)
    return 1.0 - real / padded


# --------------------------------------------------------------------------- model
def build_classifier(
    backbone_dir: str | Path,
    label_names: Sequence[str],
    *,
    mode: str,
    seed: int,
    unfreeze_top_layers: int = 0,
    lora: Any = None,
    init: str = "pretrained",
    settings: Any = None,
    total_steps: int = 0,
    key: str = "finetune mode",
) -> Any:
    """A sequence classifier on `backbone_dir`, its trainable parameters set by `mode`.

    `init="random"` builds the same architecture (the folder's config.json) with fresh weights
    drawn from `seed` instead of loading the checkpoint: the random-init control arm.
    `lora` is the finetune.lora params section (rank, alpha, dropout, target_modules);
    `settings` the finetune section whose adalora / prefix / adapter settings those modes read,
    `total_steps` the optimizer steps AdaLoRA schedules its pruning over, `key` the params key
    an unsupported combination is reported under (finetune.backbones.<name>.mode).
    Returns a transformers model (`full`, `frozen`), a peft model (`lora`, `adalora`) or a
    lmpipe.inference.peft_modules wrapper (`prefix`, `adapter`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    backbone_dir = Path(backbone_dir)
    if not (backbone_dir / "config.json").is_file():
        raise LmpipeError(f"{backbone_dir}/config.json: file not found (not a transformers model folder)")
    quiet_transformers()
    labels = dict(
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    torch.manual_seed(seed)  # the fresh pooler / classifier weights depend on the seed only
    if init == "random":
        config = AutoConfig.from_pretrained(backbone_dir, local_files_only=True, **labels)
        model = AutoModelForSequenceClassification.from_config(config)
        log.info("%s: architecture only, every weight freshly initialised (init: random)", backbone_dir)
    elif init == "pretrained":
        model, info = AutoModelForSequenceClassification.from_pretrained(
            backbone_dir, local_files_only=True, output_loading_info=True, **labels
        )
        fresh = sorted({k.rsplit(".", 1)[0] for k in info.get("missing_keys", [])})
        log.info("%s: freshly initialised modules: %s", backbone_dir, ", ".join(fresh) or "none")
    else:
        raise LmpipeError(f"finetune init must be one of ['pretrained', 'random'] (got {init!r})")
    if mode == "full":
        return model
    if mode == "frozen":
        return _freeze(model, unfreeze_top_layers)
    if mode == "lora":
        return _add_lora(model, lora, seed)
    if mode in PEFT_MODES and settings is None:
        raise LmpipeError(f"{mode} mode needs the finetune params section")
    if mode == "adalora":
        return peft_modes.add_adalora(model, settings.adalora, total_steps, seed)
    if mode == "prefix":
        return peft_modes.add_prefix(model, settings.prefix, head_prefixes(model), seed, key)
    if mode == "adapter":
        return peft_modes.add_adapter(model, settings.adapter, head_prefixes(model), seed, key)
    raise LmpipeError(f"{key} must be one of {['full', 'frozen', 'lora', *PEFT_MODES]} (got {mode!r})")


def head_prefixes(model: Any) -> list[str]:
    """Parameter-name prefixes of the head: the pooler and everything outside the encoder model."""
    prefix = model.base_model_prefix
    outside = sorted({n.split(".")[0] + "." for n, _ in model.named_parameters() if not n.startswith(prefix + ".")})
    pooler = [f"{prefix}.pooler."] if getattr(model.base_model, "pooler", None) is not None else []
    return pooler + outside


def _freeze(model: Any, unfreeze_top_layers: int) -> Any:
    layers = encoder_layers(model, "params.yaml: finetune.frozen.unfreeze_top_layers")
    if unfreeze_top_layers > len(layers):
        raise LmpipeError(
            f"params.yaml: finetune.frozen.unfreeze_top_layers is {unfreeze_top_layers} "
            f"but the backbone has {len(layers)} layers"
        )
    train = tuple(head_prefixes(model))
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(train)
    for layer in list(layers)[len(layers) - unfreeze_top_layers :]:
        for param in layer.parameters():
            param.requires_grad = True
    return model


def _add_lora(model: Any, lora: Any, seed: int) -> Any:
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    if lora is None:
        raise LmpipeError("lora mode needs the finetune.lora params section")
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [m for m in lora.target_modules if m not in names]
    if unknown:
        raise LmpipeError(
            f"params.yaml: finetune.lora.target_modules {unknown} name no module of the backbone "
            f"(a backbone that names them otherwise sets finetune.backbones.<name>.lora_target_modules)"
        )
    # SEQ_CLS trains the classifier in full; the pooler too (freshly initialised on our backbone)
    pooler = ["pooler"] if getattr(model.base_model, "pooler", None) is not None else []
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=pooler or None,
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def plain_model(model: Any) -> Any:
    """The model to save: LoRA / AdaLoRA adapters merged into a plain transformers model; a prefix or
    adapter wrapper stays as it is (save_classifier writes its extra weights beside)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# --------------------------------------------------------------------------- loss and evaluation
def classification_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Mean cross-entropy of a batch and its count of real (non-pad) tokens."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits.float(), batch["labels"])
    return loss, int(batch["attention_mask"].sum())


def make_evaluator(
    encoded: dict[str, list[list[int]]], labels: np.ndarray, pad_id: int
) -> Callable[[Any], dict[str, float]]:
    """`evaluate(model) -> {val_loss, val_accuracy, val_f1}` on a fixed, pre-encoded split."""

    ids = encoded["input_ids"]

    def evaluate(model: Any) -> dict[str, float]:
        return validation_metrics(log_softmax(torch_logits(model, ids, pad_id, EVAL_BATCH)), labels)

    return evaluate


# --------------------------------------------------------------------------- saving
# --------------------------------------------------------------------------- the whole run
LOG_EVERY = 10  # train-curve rows every 10 steps: ~20-40 s apart on 2 cores


def classifier_flops_per_token(config: Any, seq_len: int, mode: str, unfrozen_layers: int = 0) -> float:
    """Training FLOPs per token of the encoder layers under `mode` (lmpipe.train.flops accounting).

    Per layer, the forward costs F = encoder_flops / 3 and the backward 2F (activation grads F,
    weight grads F). full: 3F per layer; frozen: F per frozen layer (nothing below needs
    gradients) and 3F per unfrozen top layer; lora, adalora, prefix, adapter: 2F per layer
    (activation grads flow through every layer, weight grads only for the small added weights).
    The classifier head, the adapters and the prefix keys are negligible.
    """
    from lmpipe.train.flops import encoder_flops_per_token, ffn_matrices

    layers = config.num_hidden_layers
    per_layer = (
        encoder_flops_per_token(1, config.hidden_size, config.intermediate_size, seq_len, ffn_matrices(config)) / 3
    )
    if mode == "full":
        return 3 * per_layer * layers
    if mode == "frozen":
        top = min(unfrozen_layers, layers)
        return per_layer * (layers - top) + 3 * per_layer * top
    return 2 * per_layer * layers


def fingerprint(params: Any, backbone: str, inputs: Sequence[str | Path]) -> str:
    """Hash of what defines a fine-tuning run besides the loop config: params and input hashes.

    A checkpoint with another fingerprint is never resumed (lmpipe.train.training).
    """

    cfg = params.finetune.model_dump(mode="json")
    for key, off in (
        ("adversarial", cfg["adversarial"]["method"] == "none"),
        ("augmentation", cfg["augmentation"]["copies"] == 0),
    ):
        if off:  # an option left off keeps the fingerprint (and so the resume point) of a run without it
            cfg.pop(key)
    payload = {
        "seed": params.base.seed,
        "backbone": backbone,
        "run": cfg.pop("backbones")[backbone],
        "finetune": cfg,
        "inputs": {str(p): dvc_md5(p) for p in inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def layer_lr_scales(num_layers: int, decay: float) -> tuple[tuple[str, float], ...]:
    """(regex, multiplier) pairs of layer-wise lr decay (TrainConfig.lr_scales): encoder layer i
    of L (0 = bottom) trains at decay^(L - i), the embeddings at decay^(L + 1), the head at 1.
    Matches BERT/RoFormer (`encoder.layer.i.`) and ModernBERT (`layers.i.`) names, LoRA-wrapped too."""
    if decay == 1.0:
        return ()
    layers = tuple((rf"(encoder\.layer|\blayers)\.{i}\.", decay ** (num_layers - i)) for i in range(num_layers))
    return layers + ((r"\bembeddings\.", decay ** (num_layers + 1)),)


def train_config(params: Any, backbone: str, num_layers: int = 0) -> Any:
    """The shared loop's TrainConfig from finetune params and the backbone's lr / max_steps."""
    from lmpipe.train.training import TrainConfig

    cfg, run = params.finetune, params.finetune.backbones[backbone]
    return TrainConfig(
        max_steps=run.max_steps,
        grad_accum=cfg.grad_accum,
        lr=run.lr,
        weight_decay=cfg.weight_decay,
        warmup_steps=round(cfg.warmup_ratio * run.max_steps),
        clip_norm=cfg.clip_norm,
        fused=cfg.fused_optimizer,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        log_every=min(LOG_EVERY, cfg.eval_every),
        precision=cfg.precision,
        lr_scales=layer_lr_scales(num_layers, cfg.layer_lr_decay),
        early_stopping_metric=cfg.early_stopping.metric,
        higher_is_better=cfg.early_stopping.metric != "val_loss",
        patience=cfg.early_stopping.patience,
    )


@dataclass
class Finetuned:
    """The outcome of `run_finetune`: what the stage saves and reports."""

    model: Any
    """Plain transformers classifier on the CPU holding the best weights (LoRA merged)."""
    tokenizer: Any
    """The backbone's tokenizer, saved beside the model."""
    info: dict[str, Any]
    """lmpipe.json: how to encode text for this model, and its validation metrics."""
    metrics: dict[str, Any]
    """reports/finetune/<backbone>/metrics.json."""


def load_finetune_splits(processed_dir: str | Path, cfg: Any, seed: int) -> tuple[list[str], tuple, tuple]:
    """(label names, (train texts, ids) subsampled per finetune.max_train_examples, (val texts, ids))."""
    check_processed(processed_dir)
    names = load_label_names(processed_dir)
    texts, labels = load_split(processed_dir, "train", len(names))
    keep = stratified_subsample(labels, cfg.max_train_examples, seed)
    val = load_split(processed_dir, "val", len(names))
    return names, ([texts[i] for i in keep], labels[keep]), val


def classifier_for(run: Any, cfg: Any, names: list[str], seed: int, backbone: str = "<name>") -> Any:
    """The classifier of backbone run `run` (its own LoRA targets if set); max_length must fit it."""
    lora, settings = cfg.lora, cfg
    if run.lora_target_modules is not None:
        targets = {"target_modules": list(run.lora_target_modules)}
        lora = lora.model_copy(update=targets)
        settings = cfg.model_copy(update={"adalora": cfg.adalora.model_copy(update=targets)})
    model = build_classifier(
        run.source,
        names,
        mode=run.mode,
        seed=seed,
        init=run.init,
        unfreeze_top_layers=cfg.frozen.unfreeze_top_layers,
        lora=lora,
        settings=settings,
        total_steps=run.max_steps,
        key=f"finetune.backbones.{backbone}.mode",
    )
    positions = getattr(model.config, "max_position_embeddings", cfg.max_length)
    if cfg.max_length > positions:
        raise LmpipeError(
            f"params.yaml: finetune.max_length ({cfg.max_length}) exceeds the {positions} positions of {run.source}"
        )
    return model


def finetune_report(result: Any, run: Any, cfg: Any, backbone: str, counts: dict[str, Any]) -> tuple[dict, dict]:
    """(lmpipe.json, metrics.json) of a finished run; `counts` adds example, token and parameter counts."""
    best = {k: float(v) for k, v in sorted(result.best_metrics.items())}
    info = {
        "backbone": backbone,
        "source": run.source,
        "mode": run.mode,
        "init": run.init,
        "max_length": cfg.max_length,
        "truncation": cfg.truncation,
        "best_step": result.best_step,
        "val_metrics": best,
    }
    metrics = {
        **best,
        "mode": run.mode,
        "best_step": result.best_step,
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "tokens_per_s": result.tokens_per_s,
        "train_seconds": result.train_seconds,
        **counts,
    }
    if result.mfu is not None:
        metrics["mfu"] = result.mfu
    return info, metrics


def train_batches(
    cfg: Any, seed: int, tokenizer: Any, texts: list[str], labels: np.ndarray, tracker: Any = None
) -> tuple[Callable, list[int], float, dict[str, int]]:
    """(batch_at, token lengths, padding share, augmentation figures) of the train split,
    augmented first when finetune.augmentation is on (the train split only)."""
    texts, labels, augmented = augmentation.augment_train(texts, labels, cfg.augmentation, seed, tracker)
    encoded = encode_texts(tokenizer, texts, cfg.max_length, cfg.truncation)
    batch_at = make_batch_at(
        encoded,
        labels,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        seed=seed,
        pad_id=tokenizer.pad_token_id,
    )
    buckets = batch_at.buckets  # type: ignore[attr-defined]
    lengths = [len(x) for x in encoded["input_ids"]]
    pad = padding_share([buckets.indices(i) for i in range(buckets.batches_per_epoch)], lengths)
    return batch_at, lengths, pad, augmented


def run_finetune(
    params: Any,
    backbone: str,
    *,
    processed_dir: str | Path,
    checkpoint_dir: str | Path,
    curves_dir: str | Path,
    perf_curve: str | Path | None = None,
    device: Any,
    tracker: Any = None,
) -> Finetuned:
    """Fine-tune backbone `backbone` (a key of finetune.backbones) with the shared loop."""
    from lmpipe.train.flops import peak_flops
    from lmpipe.train.training import resolve_precision, train

    cfg, seed = params.finetune, params.base.seed
    run = cfg.backbones[backbone]
    names, (texts, labels), (val_texts, val_labels) = load_finetune_splits(processed_dir, cfg, seed)
    tokenizer = load_tokenizer(run.source)
    model = classifier_for(run, cfg, names, seed, backbone)
    fgm = adversarial.build(cfg.adversarial.method, cfg.adversarial.epsilon, model)  # None when off
    trainable, trained_total = count_params(model)  # adapters / prefixes included
    batch_at, lengths, pad, augmented = train_batches(cfg, seed, tokenizer, texts, labels, tracker)
    val_enc = encode_texts(tokenizer, val_texts, cfg.max_length, cfg.truncation)
    pad_id = tokenizer.pad_token_id
    log.info(
        "finetune@%s: %d train / %d val examples, %.0f tokens each on average, %.1f%% padding with length bucketing",
        backbone,
        len(lengths),
        len(val_texts),
        np.mean(lengths),
        100 * pad,
    )
    result = train(
        model,
        loss_fn=peft_modes.adalora_loss if run.mode == "adalora" else classification_loss,
        batch_at=batch_at,
        evaluate=make_evaluator(val_enc, val_labels, pad_id),
        config=train_config(params, backbone, model.config.num_hidden_layers),
        device=device,
        checkpoint_dir=checkpoint_dir,
        fingerprint=fingerprint(params, backbone, [processed_dir, run.source]),
        tracker=tracker,
        flops_per_token=classifier_flops_per_token(
            model.config, cfg.max_length, run.mode, cfg.frozen.unfreeze_top_layers
        ),
        peak_flops=peak_flops(params.base.peak_flops, device, resolve_precision(cfg.precision, device))[0],
        curves_dir=curves_dir,
        perf_curve=perf_curve,
        desc=f"finetune@{backbone}",
        adversarial=fgm,
        step_hook=peft_modes.AdaLoraStep(model) if run.mode == "adalora" else None,
    )
    plain = plain_model(model).to("cpu")
    _, total = count_params(plain)
    share = trainable / trained_total
    log.info(
        "finetune@%s (%s): %s of %s parameters trained (%.2f%%)",
        backbone,
        run.mode,
        f"{trainable:,}",
        f"{trained_total:,}",
        100 * share,
    )
    counts = {
        "trainable_params": trainable,
        "trainable_share": share,  # of the model as trained (LoRA factors, prefixes, adapters included)
        "total_params": total,  # of the saved model (LoRA merged)
        "train_examples": len(texts),
        "val_examples": len(val_texts),
        "mean_tokens": float(np.mean(lengths)),
        "pad_share": pad,
        **augmented,
    }
    info, metrics = finetune_report(result, run, cfg, backbone, counts)
    return Finetuned(plain, tokenizer, info, metrics)
