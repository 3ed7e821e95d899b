"""Model FLOPs per token from the architecture, and the device's peak FLOP/s (params or measured).

Training FLOPs per input token of a BERT encoder (matmuls only; a matmul of an [m, k] by a
[k, n] matrix costs 2mkn; backward costs twice the forward, hence the factor 6 = 3 x 2):

    encoder   = 6 * N_layers  +  12 * L * T * H
    mlm_head  = 6 * (H*H + H*V) * f
    total     = encoder + mlm_head

with L layers, hidden size H, feed-forward size I, sequence length T, vocabulary V,
N_layers = L * (4*H*H + 2*H*I) the weight-matrix parameters of the layers (Q, K, V, output
projections and the two feed-forward matrices, three for a gated (GeGLU) feed-forward as in
ModernBERT, whose input matrix is H x 2I; biases, norms and embedding lookups cost no
matmul FLOPs), 12*L*T*H the attention scores (Q K^T) and the weighted sum (A V) over all T
positions (non-causal: no halving), and f the share of positions that reach the MLM head (its
transform H x H and its decoder H x V): f = mask_prob when the head runs on masked positions
only (lmpipe.mlm.models.masked_lm_loss), 1 when it runs on every position. This is the PaLM-paper
accounting (6N + 12LHQT) with the head counted where it really runs.

MFU = achieved tokens/s x FLOPs per token / peak FLOP/s. The peak is `base.peak_flops` when set,
else measured by `measure_peak_flops`: a square matmul repeated for about a second in the dtype
the training loop computes in (fp32 on CPU, bf16 under autocast on CUDA), best rate kept. On a
shared machine one probe can land in a busy second and read low (84 instead of ~175 GFLOP/s was
seen), which inflates MFU: the pretrain stage probes before and after training and reports the
higher.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

GATED_FFN_FAMILIES = ("modernbert", "llama")  # model_type values whose feed-forward is gated (3 matrices)


def ffn_matrices(config: Any) -> int:
    """H x I matrices per feed-forward: 3 when gated (GeGLU), else 2."""
    return 3 if getattr(config, "model_type", "") in GATED_FFN_FAMILIES else 2


def layer_matmul_params(num_layers: int, hidden: int, intermediate: int, ffn: int = 2) -> int:
    """Weight-matrix parameters of the encoder layers: L * (4 H^2 + ffn H I), ffn = 2 or 3 (gated)."""
    return num_layers * (4 * hidden * hidden + ffn * hidden * intermediate)


def encoder_flops_per_token(num_layers: int, hidden: int, intermediate: int, seq_len: int, ffn: int = 2) -> float:
    """Training FLOPs per token of the encoder layers: 6 N_layers + 12 L T H."""
    return 6.0 * layer_matmul_params(num_layers, hidden, intermediate, ffn) + 12.0 * num_layers * seq_len * hidden


def mlm_head_flops_per_token(hidden: int, vocab_size: int, head_fraction: float) -> float:
    """Training FLOPs per input token of the MLM head run on `head_fraction` of the positions."""
    return 6.0 * (hidden * hidden + hidden * vocab_size) * head_fraction


def mlm_flops_per_token(config: Any, seq_len: int, head_fraction: float) -> float:
    """Training FLOPs per input token of a masked-LM model (an HF BERT / RoFormer / ModernBERT config)."""
    return encoder_flops_per_token(
        config.num_hidden_layers, config.hidden_size, config.intermediate_size, seq_len, ffn_matrices(config)
    ) + mlm_head_flops_per_token(config.hidden_size, config.vocab_size, head_fraction)


def clm_flops_per_token(config: Any, seq_len: int) -> float:
    """Training FLOPs per input token of a decoder (this module's accounting):

        6 N_layers + 12 L T H  +  6 H V (T - 1) / T

    the layers' weight matrices (SwiGLU: 3 feed-forward matrices), attention over all T
    positions (the PaLM count: no halving for the causal mask, as nanoGPT reports MFU), and the
    tied LM head (H x V) on the T - 1 positions that have a target (`lmpipe.clm.models.next_token_loss`).
    """
    ffn = ffn_matrices(config)
    hidden, vocab = config.hidden_size, config.vocab_size
    layers = encoder_flops_per_token(config.num_hidden_layers, hidden, config.intermediate_size, seq_len, ffn)
    return layers + 6.0 * hidden * vocab * (seq_len - 1) / seq_len


def probe_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype the loop's matmuls run in: bf16 under bf16 autocast, else fp32."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None, seconds: float = 1.0
) -> float:
    """FLOP/s of the best of repeated [size x size] @ [size x size] matmuls over ~`seconds`.

    size defaults to 2048 on CPU (0.15 s per product at ~115 GFLOP/s on 2 cores) and 8192 on
    CUDA (large enough to saturate the tensor cores).
    """
    size = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    torch.mm(a, b)  # warm-up: kernel selection, page faults
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    reps = 1 if device.type == "cpu" else 10
    while True:
        start = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        elapsed = time.perf_counter() - start
        best = max(best, 2.0 * size**3 * reps / elapsed)
        if time.perf_counter() >= deadline:
            return best


def peak_flops(override: float | None, device: torch.device, precision: str) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): `override` (params base.peak_flops) or a measurement."""
    if override:
        return float(override), "params"
    return measure_peak_flops(device, probe_dtype(device, precision)), "measured"


def mfu(tokens_per_s: float, flops_per_token: float | None, peak: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: tokens/s x FLOPs per token / (peak FLOP/s x devices); None if unknown."""
    if not flops_per_token or not peak or not math.isfinite(tokens_per_s):
        return None
    return tokens_per_s * flops_per_token / (peak * devices)
