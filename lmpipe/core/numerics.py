"""The numeric environment of a stage: which kernels run, pinned so other machines get the same bytes.

Every float a stage computes goes through kernels that the libraries pick by CPU at run time.
Measured here (tests/unit/test_numerics.py, bench/machines.jsonl), each of these changes bytes:
- torch's ATen kernels (softmax, layer_norm, reductions, fused AdamW, `normal_` init) are built
  for default / AVX2 / AVX-512 and picked by CPU: `ATEN_CPU_CAPABILITY` pins the build;
- numpy 2.4's X86_V4 (AVX-512) paths give other bytes for `log`, `exp`, `log1p` and the order of
  ties in `argsort` (TF-IDF's idf and sublinear tf are `np.log`): `NPY_DISABLE_CPU_FEATURES`;
- OpenBLAS (numpy's and scipy's; scikit-learn's lbfgs is scipy's L-BFGS-B on it) picks kernels by
  core type: `OPENBLAS_CORETYPE`. Haswell's are AVX2 + FMA code, correct on every AVX2 machine;
  an AMD Zen 3 and an Intel AVX2 core pick them by themselves, AVX-512 machines pick SkylakeX;
- MKL's `sgemm` (torch's fp32 matmuls): `MKL_CBWR=AVX2` and `MKL_ENABLE_INSTRUCTIONS=AVX2` hold an
  Intel AVX-512 CPU to the AVX2 code branch; on AMD, MKL runs its AVX2 code whatever the CPU has
  (a Zen 4 gives a Zen 3's matmul bytes without a pin), and `MKL_CBWR=AVX2` is silently AUTO;
- thread counts change the order of sums (ATen reductions, OpenBLAS `ddot`, AdamW steps), and MKL's
  dynamic threading may pick fewer threads than asked: every pool gets `base.threads`,
  `MKL_DYNAMIC=FALSE`.

`portable` (the default) sets all of these to what every x86-64 CPU with AVX2 + FMA runs, so such
a machine makes the committed bytes. `fast` pins only the thread counts and lets each library take
this CPU's fastest kernels (AVX-512 where present): same bytes on the same machine, not elsewhere.

The variables must be set before numpy or torch loads: `stages/__init__.py` calls `pin_from_params()`
when Python runs `python -m stages.NAME`, before the stage imports anything else. `record()` then
reads back what the loaded libraries actually use and, in portable mode, stops a stage whose
kernels escaped the pin (a library loaded too early). Guarantees and limits: README, "Same bytes
on any machine".
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any

from lmpipe.core.errors import LmpipeError

MODES: tuple[str, ...] = ("portable", "fast")
KEY = "base.numerics"
REQUIRED_FLAGS = ("avx2", "fma")  # the portable kernels' instruction set
LOADED_TOO_EARLY = ("numpy", "torch", "scipy", "sklearn")

# What `portable` fixes, whatever the machine or the shell exports. ISA first, then threads.
PORTABLE_ISA: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN runs convolutions and reduced-precision matmuls only
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
    "OPENBLAS_CORETYPE": "Haswell",
}
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# ambient values the pin replaced, for the record (a user's own setting is never lost silently)
_replaced: dict[str, str] = {}
_pinned: dict[str, Any] = {}


def pinned_env(mode: str, threads: int) -> dict[str, str]:
    """The environment variables `mode` sets for `threads` threads per pool."""
    if mode not in MODES:
        raise LmpipeError(f"params.yaml: {KEY} must be one of {list(MODES)} (got {mode!r})")
    env = dict(PORTABLE_ISA) if mode == "portable" else {}
    if threads:
        env.update({name: str(threads) for name in THREAD_VARS}, MKL_DYNAMIC="FALSE")
    return env


def cpu_info() -> dict[str, Any]:
    """This CPU: model name, vendor, and the instruction-set flags that decide kernels."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
                if "flags" in fields:  # the first processor's block is enough
                    break
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")
    return {
        "model": fields.get("model name") or platform.processor() or platform.machine(),
        "vendor": fields.get("vendor_id"),
        "family_model": f"{fields.get('cpu family')}/{fields.get('model')}",  # e.g. AMD 25/17: Zen 4 (Genoa)
        "flags": [flag for flag in wanted if flag in flags],
        "flags_known": bool(flags),
    }


def pin(mode: str, threads: int) -> dict[str, str]:
    """Set `mode`'s variables in os.environ (before numpy/torch load); return what was set.

    Portable needs AVX2 + FMA (its kernels' instructions); a CPU without them stops here naming
    the key. Portable also needs a fixed thread count (`base.threads` >= 1).
    """
    early = [name for name in LOADED_TOO_EARLY if name in sys.modules]
    if early and mode == "portable":
        raise LmpipeError(
            f"{KEY}: portable numerics must be set before {early} load; run the stage as python -m stages.NAME"
        )
    if mode == "portable":
        cpu = cpu_info()
        missing = [flag for flag in REQUIRED_FLAGS if flag not in cpu["flags"]]
        if cpu["flags_known"] and missing:
            raise LmpipeError(
                f"params.yaml: {KEY} is 'portable' (AVX2 + FMA kernels) but this CPU ({cpu['model']}) lacks "
                f"{missing}; set {KEY}: fast to run with its own kernels (other bytes than the committed lock)"
            )
        if not threads:
            raise LmpipeError(
                f"params.yaml: {KEY}: portable needs base.threads >= 1 (got 0: the core count decides sums)"
            )
    env = pinned_env(mode, threads)
    for name, value in env.items():
        if os.environ.get(name) not in (None, value):
            _replaced.setdefault(name, os.environ[name])
        os.environ[name] = value
    _pinned.update(mode=mode, threads=threads, env=env)
    return env


def pin_from_params(path: str = "params.yaml") -> None:
    """pin() with `base.numerics` / `base.threads` of params.yaml; a params error is left for the
    stage's own load_params() to report (one line, inside the stage's error handling)."""
    from lmpipe.core.params import load_params

    try:
        base = load_params(path).base
    except LmpipeError:
        return
    try:
        pin(base.numerics, base.threads)
    except LmpipeError as exc:  # before the stage's own error handling exists: the same one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _library_state() -> dict[str, Any]:
    """What the loaded numeric libraries run now (a library not loaded yet is not loaded here)."""
    state: dict[str, Any] = {}
    if "torch" in sys.modules:
        import torch

        state["torch_isa"] = torch.backends.cpu.get_cpu_capability()
        state["torch_threads"] = torch.get_num_threads()
        state["mkl"] = next(
            (line.strip(" -") for line in torch.__config__.show().splitlines() if "Math Kernel Library" in line), None
        )
    if "numpy" in sys.modules:
        import numpy as np
        from numpy._core._multiarray_umath import __cpu_dispatch__, __cpu_features__

        state["numpy"] = np.__version__
        state["numpy_simd"] = [name for name in __cpu_dispatch__ if __cpu_features__.get(name)]
        from threadpoolctl import threadpool_info

        state["blas"] = sorted(
            {
                f"{i['internal_api']} {i.get('version')} {i.get('architecture')} x{i['num_threads']}"
                for i in threadpool_info()
            }
        )
    return state


def _escaped(state: dict[str, Any], threads: int) -> list[str]:
    """How the loaded libraries run other kernels than portable pins (empty: none)."""
    wrong = []
    if state.get("torch_isa", "AVX2") != "AVX2":
        wrong.append(f"torch runs {state['torch_isa']} kernels")
    if threads and state.get("torch_threads", threads) != threads:
        wrong.append(f"torch runs {state['torch_threads']} threads")
    if set(state.get("numpy_simd", [])) & {"X86_V4", "AVX512_ICL", "AVX512_SPR"}:
        wrong.append(f"numpy dispatches {state['numpy_simd']}")
    for blas in state.get("blas", []):
        if blas.startswith("openblas") and " Haswell " not in blas:
            wrong.append(f"OpenBLAS runs {blas}")
    return wrong


def record() -> dict[str, Any]:
    """The numeric environment of this process: the mode and its pins, the CPU, what the loaded
    libraries run, and which ambient variables the pin replaced. In portable mode, a library
    that escaped the pin stops the stage (its bytes would not be the portable ones)."""
    mode = _pinned.get("mode", "unpinned")
    state = _library_state()
    if mode == "portable":
        wrong = _escaped(state, _pinned["threads"])
        if wrong:
            raise LmpipeError(f"{KEY}: portable numerics did not take effect: {'; '.join(wrong)}")
    return {
        "mode": mode,
        "pinned": dict(sorted(_pinned.get("env", {}).items())),
        "replaced": dict(sorted(_replaced.items())),
        "cpu": cpu_info(),
        **state,
    }


def contract(numerics: dict[str, Any]) -> dict[str, Any]:
    """The part of a record that decides the bytes, for lineage.json and the model card.

    Portable: the mode and its pins (the same on every AVX2 machine, so two machines' exports
    stay byte-identical). Fast: the CPU and the kernels it picked as well, since they decide.
    """
    out = {"mode": numerics["mode"], "pinned": numerics["pinned"]}
    if numerics["mode"] != "portable":
        cpu = numerics["cpu"]
        out.update(cpu=f"{cpu['model']} ({', '.join(cpu['flags'])})", torch_isa=numerics.get("torch_isa"))
    return out


TAG_PREFIX = "lmpipe.numerics."


def tags(numerics: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of a record: `lmpipe.numerics.mode`, `.cpu`, `.torch_isa`, `.blas`, ..."""
    import json

    cpu = numerics["cpu"]
    out = {
        "mode": numerics["mode"],
        "cpu": f"{cpu['model']} ({cpu.get('vendor')} family/model {cpu.get('family_model')})",
        "cpu_flags": " ".join(cpu["flags"]),
        "pinned": json.dumps(numerics["pinned"], sort_keys=True),
        "replaced": json.dumps(numerics["replaced"], sort_keys=True),
    }
    for key in ("torch_isa", "torch_threads", "mkl", "numpy_simd", "blas"):
        if key in numerics:
            value = numerics[key]
            out[key] = " ".join(value) if isinstance(value, list) else str(value)
    return {TAG_PREFIX + key: value for key, value in out.items()}


def fingerprint() -> dict[str, str]:
    """Short md5s of small computations through every kernel family the pipeline uses: an MKL
    matmul, a Linear+GELU+Linear+LayerNorm+softmax block forward and backward (ATen), 5 fused AdamW
    steps, numpy's log, a scikit-learn lbfgs logistic regression (scipy's L-BFGS-B on OpenBLAS).
    Run in a process pinned like a stage (bench.fingerprint, tests/unit/test_numerics.py): two
    machines in portable mode must print the same values."""
    import hashlib

    import numpy as np
    import scipy.sparse as sp
    import torch
    from sklearn.linear_model import LogisticRegression

    def md5(value: Any) -> str:
        array = value.detach().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        return hashlib.md5(np.ascontiguousarray(array).tobytes()).hexdigest()[:12]

    g = torch.Generator().manual_seed(0)
    out = {"mm": md5(torch.randn(97, 131, generator=g) @ torch.randn(131, 61, generator=g))}
    torch.manual_seed(0)
    nn = torch.nn
    block = nn.Sequential(nn.Linear(64, 192), nn.GELU(), nn.Linear(192, 64), nn.LayerNorm(64))
    x = torch.randn(8, 32, 64, generator=g)
    y = torch.softmax(block(x) @ block(x).transpose(1, 2) / 8.0, -1).sum(-1)
    out["fwd"] = md5(y)
    y.square().mean().backward()
    out["bwd"] = md5(block[0].weight.grad)
    opt = torch.optim.AdamW(block.parameters(), lr=1e-2, fused=True)
    for _ in range(5):
        opt.zero_grad()
        block(x).square().mean().backward()
        opt.step()
    out["adamw"] = md5(torch.cat([p.detach().flatten() for p in block.parameters()]))
    rng = np.random.default_rng(0)
    out["log"] = md5(np.log(rng.random(50_000) * 100 + 1))
    features = sp.random(1500, 800, density=0.02, random_state=0, format="csr")
    target = (features @ rng.standard_normal(800) > 0).astype(int)
    out["lbfgs"] = md5(LogisticRegression(max_iter=100).fit(features, target).coef_)
    return out
