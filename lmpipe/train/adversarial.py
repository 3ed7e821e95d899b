"""Adversarial training on the embeddings: the fast gradient method (FGM, Miyato et al. 2017).

The one training loop (lmpipe.train.training) takes an optional `adversarial` hook. For each
micro-batch it calls `adversarial(backward_pass)` instead of `backward_pass(1.0)`, where
`backward_pass(weight)` forwards the micro-batch, backpropagates loss x weight / grad_accum
(gradients accumulate) and returns (loss, n_tokens). `FGM.__call__` runs two passes:

1. the clean pass at weight 1/2, which also keeps the gradient g of the loss with respect to
   the output of the word-embedding module (a forward hook retains it);
2. the adversarial pass at weight 1/2, with that output moved by r = epsilon x g / ||g||_2 (the
   norm over the whole micro-batch), then the hook is disarmed.

The step's gradient is thus that of (clean loss + adversarial loss) / 2: clipping and the lr
mean what they mean without FGM, and epsilon = 0 gives bit for bit the gradient of no FGM
(the passes add two exact halves), provided the model draws no dropout.

The perturbation goes on the embedding OUTPUT, not the embedding weights (the variant of many
fine-tuning scripts, which add r to `word_embeddings.weight` and restore it after). It is the
same first-order attack on the looked-up vectors, and it works in every mode: with frozen
embeddings (modes frozen and lora) the weights get no gradient, but the output can ask for one
(the clean backward then runs through the frozen layers too). Nothing is written into the
weights, so nothing has to be restored. Evaluation (under no_grad) is never perturbed.

torch is imported inside functions: lmpipe.finetune imports this module at its top.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lmpipe.core.errors import LmpipeError

if TYPE_CHECKING:  # pragma: no cover
    import torch

BackwardPass = Callable[[float], "tuple[torch.Tensor, Any]"]


def input_embeddings(model: Any, key: str) -> torch.nn.Module:
    """The word-embedding module of a transformers or peft model, or of the transformers model a
    wrapper holds as `.model` (the prefix and adapter modes); an error naming `key` if none."""
    import torch

    module = None
    for candidate in (model, getattr(model, "model", None)):
        getter = getattr(candidate, "get_input_embeddings", None)
        module = getter() if callable(getter) else None
        if module is not None:
            break
    if not isinstance(module, torch.nn.Embedding):
        raise LmpipeError(
            f"params.yaml: {key} needs a model with a word-embedding layer "
            f"(get_input_embeddings()); {type(model).__name__} has none"
        )
    return module


class FGM:
    """The FGM hook of the training loop (see the module docstring). Its forward hook on the
    embeddings is inert outside `__call__` (it stays until `close()` and changes nothing)."""

    def __init__(self, embeddings: torch.nn.Module, epsilon: float) -> None:
        if not epsilon >= 0:
            raise LmpipeError(f"FGM epsilon must be >= 0 (got {epsilon!r})")
        self.epsilon = float(epsilon)
        self._armed = False
        self._output: torch.Tensor | None = None
        self._delta: torch.Tensor | None = None
        self._handle = embeddings.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        import torch

        if not (self._armed and torch.is_grad_enabled()):
            return None
        if self._delta is not None:
            return output + self._delta.to(output.dtype)
        if not output.requires_grad:  # frozen embeddings: the output is a leaf that may ask for a gradient
            output.requires_grad_(True)
        output.retain_grad()
        self._output = output
        return output

    def perturbation(self, grad: torch.Tensor) -> torch.Tensor:
        """epsilon x grad / ||grad||_2 (zero where the gradient is zero or not finite)."""
        import torch

        grad = grad.detach().float()
        norm = torch.linalg.vector_norm(grad)
        if not bool(torch.isfinite(norm)) or float(norm) == 0.0:
            return torch.zeros_like(grad)
        return self.epsilon * grad / norm

    def __call__(self, backward_pass: BackwardPass) -> tuple[torch.Tensor, Any]:
        self._armed, self._output = True, None
        try:
            loss, n_tokens = backward_pass(0.5)
            output, self._output = self._output, None
            if output is None or output.grad is None:
                raise LmpipeError("FGM: no gradient reached the word-embedding output (is it used by the forward?)")
            self._delta = self.perturbation(output.grad)
            backward_pass(0.5)
        finally:
            self._armed, self._output, self._delta = False, None, None
        return loss, n_tokens

    def close(self) -> None:
        """Remove the forward hook: the model behaves as if FGM had never been attached."""
        self._handle.remove()


def build(method: str, epsilon: float, model: Any, key: str = "finetune.adversarial.method") -> FGM | None:
    """The loop hook for `method` (`none` -> None); fails before any work if the model cannot take it."""
    if method == "none":
        return None
    if method == "fgm":
        return FGM(input_embeddings(model, key), epsilon)
    raise LmpipeError(f"params.yaml: {key} must be one of ['none', 'fgm'] (got {method!r})")
