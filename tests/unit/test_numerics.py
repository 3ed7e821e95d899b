"""lmpipe.core.numerics: the pins, their effect on the loaded libraries, and the bytes they decide.

The byte checks run small probes (a matmul, a Linear+GELU+LayerNorm+softmax block forward and
backward, AdamW steps, a TF-IDF-like log and an lbfgs logistic regression) in child processes that
start the way a stage does (`python -m stages.NAME`: `stages/__init__.py` pins before numpy or torch
loads), under two ambient environments whose kernels differ on any AVX2 machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe.core import numerics
from lmpipe.core.errors import LmpipeError
from lmpipe.core.params import parse_params

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
sys.argv[0] = "-m"  # what `python -m stages.NAME` shows while the package loads
import stages  # pins from ./params.yaml, as a stage does
import torch
from lmpipe.core import numerics

torch.set_num_threads(2)
print(json.dumps({**numerics.fingerprint(), "record": numerics.record()}))
"""


def probe(tmp_path: Path, mode: str, ambient: dict[str, str]) -> dict:
    """Run PROBE in a project folder whose params.yaml sets base.numerics = mode."""
    params = (ROOT / "params.yaml").read_text(encoding="utf-8")
    folder = tmp_path / f"{mode}-{len(list(tmp_path.iterdir()))}"
    folder.mkdir()
    (folder / "params.yaml").write_text(params.replace("numerics: portable", f"numerics: {mode}"), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in numerics.PORTABLE_ISA and k not in numerics.THREAD_VARS}
    env.update(ambient, PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# kernels every AVX2 machine has besides its default, and a thread count other than base.threads
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Sandybridge"}
BYTES = ("mm", "fwd", "bwd", "adamw", "log", "lbfgs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    tmp = tmp_path_factory.mktemp("numerics")
    return {
        "portable": probe(tmp, "portable", {}),
        "portable_other": probe(tmp, "portable", OTHER_KERNELS),
        "fast": probe(tmp, "fast", {}),
        "fast_other": probe(tmp, "fast", OTHER_KERNELS),
    }


def test_portable_gives_the_same_bytes_whatever_the_ambient_kernels(runs):
    assert {k: runs["portable"][k] for k in BYTES} == {k: runs["portable_other"][k] for k in BYTES}


def test_fast_follows_the_ambient_kernels_so_the_portable_test_can_fail(runs):
    differ = [k for k in BYTES if runs["fast"][k] != runs["fast_other"][k]]
    assert {"fwd", "bwd", "adamw", "lbfgs"} <= set(differ), differ


def test_portable_record_shows_the_pinned_kernels_and_what_it_replaced(runs):
    record = runs["portable_other"]["record"]
    assert record["mode"] == "portable"
    assert record["torch_isa"] == "AVX2" and record["torch_threads"] == 2
    assert "X86_V4" not in record["numpy_simd"]
    assert all(" Haswell " in b for b in record["blas"] if b.startswith("openblas"))
    assert record["replaced"] == OTHER_KERNELS
    assert record["pinned"]["OMP_NUM_THREADS"] == "2" and record["pinned"]["MKL_DYNAMIC"] == "FALSE"


def test_fast_record_shows_the_ambient_kernels(runs):
    record = runs["fast_other"]["record"]
    assert record["mode"] == "fast" and record["torch_isa"] == "DEFAULT"
    assert "ATEN_CPU_CAPABILITY" not in record["pinned"] and record["pinned"]["OMP_NUM_THREADS"] == "2"


def test_pinned_env_of_each_mode():
    assert numerics.pinned_env("portable", 2)["ATEN_CPU_CAPABILITY"] == "avx2"
    fast = numerics.pinned_env("fast", 3)
    assert fast == {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3", "OPENBLAS_NUM_THREADS": "3", "MKL_DYNAMIC": "FALSE"}
    assert numerics.pinned_env("fast", 0) == {}
    with pytest.raises(LmpipeError, match=r"base\.numerics must be one of \['portable', 'fast'\]"):
        numerics.pinned_env("quick", 2)


def test_portable_after_numpy_loaded_stops_with_a_clear_error():
    code = "import numpy\nfrom lmpipe.core import numerics\nnumerics.pin('portable', 2)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode != 0
    assert "base.numerics: portable numerics must be set before ['numpy'] load" in done.stderr


def test_portable_on_a_cpu_without_avx2_names_the_key(monkeypatch):
    monkeypatch.setattr(numerics, "cpu_info", lambda: {"model": "Old CPU", "flags": ["fma"], "flags_known": True})
    monkeypatch.setattr(numerics, "LOADED_TOO_EARLY", ())
    with pytest.raises(LmpipeError, match=r"base\.numerics is 'portable' .* lacks \['avx2'\]"):
        numerics.pin("portable", 2)


def test_portable_needs_a_fixed_thread_count(monkeypatch):
    monkeypatch.setattr(numerics, "LOADED_TOO_EARLY", ())
    monkeypatch.setattr(numerics, "cpu_info", lambda: {"model": "x", "flags": ["avx2", "fma"], "flags_known": True})
    with pytest.raises(LmpipeError, match=r"portable needs base\.threads >= 1"):
        numerics.pin("portable", 0)


def test_escaped_kernels_are_named():
    state = {
        "torch_isa": "AVX512",
        "torch_threads": 2,
        "numpy_simd": ["X86_V3", "X86_V4"],
        "blas": ["openblas 0.3 SkylakeX x2"],
    }
    wrong = numerics._escaped(state, 2)
    assert wrong == [
        "torch runs AVX512 kernels",
        "numpy dispatches ['X86_V3', 'X86_V4']",
        "OpenBLAS runs openblas 0.3 SkylakeX x2",
    ]
    assert numerics._escaped({"torch_isa": "AVX2", "torch_threads": 2, "blas": ["openblas 0.3 Haswell x2"]}, 2) == []


def test_contract_holds_the_cpu_only_when_it_decides_the_bytes():
    record = {
        "mode": "portable",
        "pinned": {"A": "1"},
        "cpu": {"model": "AMD EPYC", "flags": ["avx2"]},
        "torch_isa": "AVX2",
    }
    assert numerics.contract(record) == {"mode": "portable", "pinned": {"A": "1"}}
    fast = numerics.contract({**record, "mode": "fast"})
    assert fast["cpu"] == "AMD EPYC (avx2)" and fast["torch_isa"] == "AVX2"


def test_tags_flatten_the_record():
    record = {
        "mode": "fast",
        "pinned": {},
        "replaced": {},
        "cpu": {"model": "M", "flags": ["avx2", "fma"]},
        "blas": ["a", "b"],
    }
    tags = numerics.tags(record)
    assert tags["lmpipe.numerics.cpu_flags"] == "avx2 fma" and tags["lmpipe.numerics.blas"] == "a b"
    assert "lmpipe.numerics.torch_isa" not in tags


def test_params_reject_an_unknown_mode():
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["base"]["numerics"] = "turbo"
    with pytest.raises(LmpipeError, match=r"base\.numerics"):
        parse_params(raw, "params.yaml")


def test_a_stage_whose_pin_fails_exits_2_with_one_line(tmp_path):
    params = (ROOT / "params.yaml").read_text(encoding="utf-8")
    (tmp_path / "params.yaml").write_text(params.replace("threads: 2 ", "threads: 0 "), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "stages.baseline"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: params.yaml: base.numerics: portable needs base.threads >= 1 (got 0: the core count decides sums)"
    ]
