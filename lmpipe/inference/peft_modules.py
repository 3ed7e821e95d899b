"""Parameter-efficient modules that cannot be merged into a plain HF classifier: prefix-tuning and
bottleneck adapters, built by the finetune stage and rebuilt by the one loader
(`lmpipe.inference.classifier.load_classifier`).

Why our own: peft 0.21 applies prefix-tuning only to models whose forward takes
`past_key_values`; transformers 5 renamed that argument of BERT to `cache`, so peft refuses every
encoder we ship. peft has no bottleneck adapter, and the `adapters` library (AdapterHub) supports
transformers 4 only. Both modules here are small and wrap the HF classifier without touching its
weights' names, so the HF model still saves as a plain folder (`model.safetensors`) and the extra
weights go to `peft.safetensors`, described by the `peft` entry of `lmpipe.json`.

- `PrefixClassifier` (Li & Liang 2021; P-tuning v2 for classification): `num_virtual_tokens`
  trainable key and value vectors per layer and head, fed to every self-attention through the
  key/value cache that transformers' BERT and RoFormer take; the positions of the real tokens
  stay 0..L-1. Needs a backbone whose attention takes a cache (ModernBERT's does not).
- `AdapterClassifier` (Houlsby et al. 2019; Pfeiffer et al. 2020): a bottleneck
  `x + up(relu(down(x)))` on the output projection of each attention block and each FFN
  (`houlsby`) or of each FFN only (`pfeiffer`), applied before the residual add and layer norm;
  `up` starts at zero, so training starts from the backbone's own function.

torch is imported on use.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from lmpipe.core.errors import LmpipeError

PEFT_FILE = "peft.safetensors"
# output projections of the attention block and of the FFN, per family (name suffixes)
ADAPTER_SITES = {
    "houlsby": {"bert": ("attention.output.dense", "output.dense"), "modernbert": ("attn.Wo", "mlp.Wo")},
    "pfeiffer": {"bert": ("layer.{i}.output.dense",), "modernbert": ("mlp.Wo",)},
}


def takes_cache(model: Any) -> bool:
    """Whether the encoder's forward accepts a key/value cache (the road prefix-tuning takes)."""
    params = inspect.signature(model.base_model.forward).parameters
    return "cache" in params or "past_key_values" in params


def _family(model: Any) -> str:
    return "modernbert" if "modernbert" in str(model.config.model_type) else "bert"


@functools.cache
def _base() -> type:
    """The wrapper base class, defined on first use so that importing this module needs no torch."""
    import torch

    class PeftWrapper(torch.nn.Module):
        """An HF classifier (`.model`) plus extra trainable weights (`.extra`); forwards like the HF model."""

        kind = ""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        @property
        def config(self) -> Any:
            return self.model.config

        @property
        def base_model(self) -> Any:
            return self.model.base_model

        def describe(self) -> dict[str, Any]:
            """The `peft` entry of lmpipe.json: what the loader needs to rebuild `.extra`."""
            raise NotImplementedError

    return PeftWrapper


@functools.cache
def _adapter_class() -> type:
    import torch

    nn = torch.nn

    class Bottleneck(nn.Module):
        def __init__(self, hidden: int, size: int) -> None:
            super().__init__()
            self.down = nn.Linear(hidden, size)
            self.up = nn.Linear(size, hidden)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, x: Any) -> Any:
            return x + self.up(torch.relu(self.down(x)))

    class AdapterClassifier(_base()):
        kind = "adapter"

        def __init__(self, model: Any, size: int, placement: str) -> None:
            super().__init__(model)
            self.size, self.placement = size, placement
            sites = adapter_sites(model, placement)
            self.extra = nn.ModuleDict({n.replace(".", "_"): Bottleneck(model.config.hidden_size, size) for n in sites})
            for name in sites:
                adapter = self.extra[name.replace(".", "_")]
                model.get_submodule(name).register_forward_hook(lambda _m, _i, out, a=adapter: a(out))

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)

        def describe(self) -> dict[str, Any]:
            return {"kind": self.kind, "size": self.size, "placement": self.placement}

    return AdapterClassifier


@functools.cache
def _prefix_class() -> type:
    import torch

    class PrefixClassifier(_base()):
        kind = "prefix"

        def __init__(self, model: Any, num_virtual_tokens: int) -> None:
            super().__init__(model)
            if not takes_cache(model):
                raise LmpipeError(f"{type(model.base_model).__name__} takes no key/value cache")
            cfg = model.config
            self.tokens, self.layers = num_virtual_tokens, cfg.num_hidden_layers
            self.heads, self.head_dim = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
            # P-tuning v2 / peft's PrefixEncoder without projection: one vector per (token, layer, key|value)
            prefix = torch.randn(num_virtual_tokens, self.layers * 2 * cfg.hidden_size)
            self.extra = torch.nn.ParameterDict({"prefix": torch.nn.Parameter(prefix)})

        def forward(self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None) -> Any:
            from transformers import DynamicCache

            batch, length = input_ids.shape
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            kv = self.extra["prefix"].view(self.tokens, self.layers * 2, self.heads, self.head_dim)
            kv = kv.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)  # [2L, B, heads, P, d]
            cache = DynamicCache(config=self.model.config)
            for layer in range(self.layers):
                cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
            ones = attention_mask.new_ones(batch, self.tokens)
            positions = torch.arange(length, device=input_ids.device).expand(batch, -1)
            return self.model(
                input_ids=input_ids,
                attention_mask=torch.cat([ones, attention_mask], dim=1),
                token_type_ids=token_type_ids,
                position_ids=positions,
                cache=cache,
                use_cache=False,
            )

        def describe(self) -> dict[str, Any]:
            return {"kind": self.kind, "num_virtual_tokens": self.tokens}

    return PrefixClassifier


def adapter_sites(model: Any, placement: str) -> list[str]:
    """Module names of the output projections that get an adapter (see ADAPTER_SITES)."""
    import re

    suffixes = ADAPTER_SITES[placement][_family(model)]
    patterns = [re.escape(s).replace(r"\{i\}", r"\d+") + "$" for s in suffixes]
    names = [n for n, _ in model.named_modules() if any(re.search(rf"(^|\.){p}", n) for p in patterns)]
    if not names:
        raise LmpipeError(f"{type(model).__name__}: no module named {list(suffixes)} to put adapters on")
    return names


def add_adapters(model: Any, size: int, placement: str) -> Any:
    """`model` with bottleneck adapters (`AdapterClassifier`); every weight still trainable."""
    return _adapter_class()(model, size, placement)


def add_prefix(model: Any, num_virtual_tokens: int) -> Any:
    """`model` with trainable prefix keys/values (`PrefixClassifier`); every weight still trainable."""
    return _prefix_class()(model, num_virtual_tokens)


def is_wrapped(model: Any) -> bool:
    return hasattr(model, "describe") and hasattr(model, "extra")


def rebuild(model: Any, peft: dict[str, Any], tensors: dict[str, Any], where: str) -> Any:
    """The saved wrapper around a loaded HF `model`: `peft` from lmpipe.json, `tensors` from PEFT_FILE."""
    kind = peft.get("kind")
    try:
        if kind == "adapter":
            wrapped = add_adapters(model, int(peft["size"]), str(peft["placement"]))
        elif kind == "prefix":
            wrapped = add_prefix(model, int(peft["num_virtual_tokens"]))
        else:
            raise LmpipeError(f"{where}: peft kind must be one of ['adapter', 'prefix'] (got {kind!r})")
    except KeyError as exc:
        raise LmpipeError(f"{where}: peft entry misses key {exc}") from None
    missing = sorted(set(wrapped.extra.state_dict()) ^ set(tensors))
    if missing:
        raise LmpipeError(f"{where}: {PEFT_FILE} does not match the peft entry (keys {missing[:3]})")
    wrapped.extra.load_state_dict(tensors)
    return wrapped
