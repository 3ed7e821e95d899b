"""base.numerics through the real `dvc` CLI: in `fast` mode, the same stages run twice under ambient
environments whose kernels differ give other model bytes, so the portable check can fail.

The portable half is tests/integration/test_audit_rebuild.py: `lmpipe audit --rebuild` of the whole
tiny DAG under OTHER_KERNELS gives every output the committed bytes. Here one project copy in
fast mode runs the model-making stages that need no upstream model: `pretrain` (torch: ATen
kernels, MKL, AdamW) and `baseline` (numpy's log, scipy's L-BFGS-B on OpenBLAS).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmpipe.core.lineage import dvc_md5
from tests.integration.conftest import TINY, copy_project, merge, run

# kernels every AVX2 machine has besides its own choice, and a thread count other than base.threads
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Sandybridge"}
MODELS = ("models/pretrained", "models/baseline")


def repro(project: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`dvc repro ARGS pretrain baseline` under `env` added to the ambient one; the models' DVC md5s."""
    run([sys.executable, "-m", "dvc", "repro", *args, "pretrain", "baseline"], cwd=project, extra_env=env, timeout=900)
    return {path: dvc_md5(project / path) for path in MODELS}


def test_fast_models_change_bytes_under_other_kernels_so_the_portable_check_can_fail(tmp_path):
    project = copy_project(tmp_path / "project", merge(TINY, {"base": {"numerics": "fast"}}))
    fast = repro(project)
    fast_other = repro(project, "--force", "--single-item", env=OTHER_KERNELS)
    assert all(fast[path] != fast_other[path] for path in MODELS), (fast, fast_other)
    numerics = json.loads((project / "reports/perf/pretrain.json").read_text())["numerics"]
    assert numerics["mode"] == "fast" and numerics["torch_isa"] == "DEFAULT"  # the ambient kernels ran
    assert numerics["replaced"] == {"OMP_NUM_THREADS": "1"}  # fast pins the thread counts only
