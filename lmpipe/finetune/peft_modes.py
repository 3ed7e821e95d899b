"""The fine-tuning modes beyond full / frozen / lora: adalora, prefix and adapter.

- `adalora` (Zhang et al. 2023, peft's AdaLoRA): LoRA in SVD form whose ranks are pruned from
  `init_r` to an average `target_r` while training, by importance scores updated every optimizer
  step (`AdaLoraStep`, the training loop's per-step hook); its orthogonality penalty enters the
  loss (`adalora_loss`). Merged into the weights before saving, like LoRA.
- `prefix` and `adapter` (lmpipe.inference.peft_modules, which the loader shares): the backbone is
  frozen, the new weights and the head (pooler + classifier) train. Their weights stay beside the
  HF ones (peft.safetensors).

Any combination a backbone cannot take stops before training with one line naming the key.
torch and peft are imported inside functions.
"""

from __future__ import annotations

from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.inference import peft_modules


def check_targets(model: Any, targets: list[str], key: str) -> None:
    """Every name in `targets` must name a module of `model`; else an error naming `key`."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    unknown = [m for m in targets if m not in names]
    if unknown:
        raise LmpipeError(
            f"params.yaml: {key} {unknown} name no module of the backbone "
            f"(a backbone that names them otherwise sets finetune.backbones.<name>.lora_target_modules)"
        )


def add_adalora(model: Any, cfg: Any, total_steps: int, seed: int) -> Any:
    """A peft AdaLoRA model over `model`; `cfg` is finetune.adalora (its target_modules per backbone)."""
    import torch
    from peft import AdaLoraConfig, TaskType, get_peft_model

    check_targets(model, list(cfg.target_modules), "finetune.adalora.target_modules")
    tinit, tfinal = round(cfg.tinit_ratio * total_steps), round(cfg.tfinal_ratio * total_steps)
    if tinit >= total_steps - tfinal:
        raise LmpipeError(
            f"params.yaml: finetune.adalora.tinit_ratio + tfinal_ratio leave no step to prune ranks "
            f"in {total_steps} steps (tinit {tinit}, tfinal {tfinal})"
        )
    pooler = ["pooler"] if getattr(model.base_model, "pooler", None) is not None else []
    config = AdaLoraConfig(
        task_type=TaskType.SEQ_CLS,
        init_r=cfg.init_r,
        target_r=cfg.target_r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        modules_to_save=pooler or None,
        tinit=tinit,
        tfinal=tfinal,
        deltaT=cfg.delta_t,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        orth_reg_weight=cfg.orth_reg_weight,
        total_step=total_steps,
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def train_extra_and_head(wrapped: Any, head: list[str]) -> Any:
    """Freeze the backbone of a prefix / adapter wrapper: only `.extra` and the head train."""
    train = tuple(f"model.{p}" for p in head) + ("extra.",)
    for name, param in wrapped.named_parameters():
        param.requires_grad = name.startswith(train)
    return wrapped


def add_prefix(model: Any, cfg: Any, head: list[str], seed: int, key: str) -> Any:
    """`model` with trainable prefixes (finetune.prefix); a backbone without a key/value cache is an error."""
    import torch

    if not peft_modules.takes_cache(model):
        raise LmpipeError(
            f"params.yaml: {key} is prefix, but {type(model.base_model).__name__} takes no key/value cache "
            f"(prefix-tuning needs BERT, RoFormer or MiniLM; use adapter, lora or adalora here)"
        )
    torch.manual_seed(seed)
    return train_extra_and_head(peft_modules.add_prefix(model, cfg.num_virtual_tokens), head)


def add_adapter(model: Any, cfg: Any, head: list[str], seed: int, key: str) -> Any:
    """`model` with bottleneck adapters (finetune.adapter); a backbone without the sites is an error."""
    import torch

    torch.manual_seed(seed)
    try:
        wrapped = peft_modules.add_adapters(model, cfg.size, cfg.placement)
    except LmpipeError as exc:
        raise LmpipeError(f"params.yaml: {key} is adapter, but {exc}") from None
    return train_extra_and_head(wrapped, head)


def adalora_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """Cross-entropy + AdaLoRA's orthogonality penalty (peft adds it when labels are passed)."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss.float(), int(batch["attention_mask"].sum())


class AdaLoraStep:
    """The training loop's per-step hook for AdaLoRA: importance update and rank budget after each
    optimizer step (before the gradients are cleared); its state goes into the checkpoint, so a
    resumed run prunes exactly as an uninterrupted one."""

    def __init__(self, peft_model: Any) -> None:
        self.tuner = peft_model.base_model  # peft's AdaLoraModel

    def __call__(self, step: int) -> None:
        self.tuner.update_and_allocate(step)

    def state_dict(self) -> dict[str, Any]:
        alloc = self.tuner.rankallocator
        config = self.tuner.peft_config[self.tuner.trainable_adapter_name]
        return {
            "ipt": dict(alloc.ipt),
            "exp_avg_ipt": dict(alloc.exp_avg_ipt),
            "exp_avg_unc": dict(alloc.exp_avg_unc),
            "rank_pattern": config.rank_pattern,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        alloc = self.tuner.rankallocator
        for key in ("ipt", "exp_avg_ipt", "exp_avg_unc"):
            setattr(alloc, key, dict(state[key]))
        self.tuner.peft_config[self.tuner.trainable_adapter_name].rank_pattern = state["rank_pattern"]
