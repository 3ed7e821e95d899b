"""base.numerics through the real `dvc` CLI: the same stage run twice under ambient environments whose
kernels differ gives the same model bytes in portable mode, and other bytes in fast mode (so the
portable check can fail).

One project copy, the model-making stages that need no upstream model: `pretrain` (torch: ATen
kernels, MKL, AdamW) and `baseline` (numpy's log, scipy's L-BFGS-B on OpenBLAS). The whole tiny DAG
under another environment is tests/integration/test_audit_rebuild.py's identical outcome.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from lmpipe.core.lineage import dvc_md5
from tests.integration.conftest import TINY, copy_project, merge, run

# kernels every AVX2 machine has besides its own choice, and a thread count other than base.threads
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1", "OPENBLAS_CORETYPE": "Sandybridge"}
MODELS = ("models/pretrained", "models/baseline")


def repro(project: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """`dvc repro ARGS pretrain baseline` under `env` added to the ambient one; the models' DVC md5s."""
    run([sys.executable, "-m", "dvc", "repro", *args, "pretrain", "baseline"], cwd=project, extra_env=env, timeout=900)
    return {path: dvc_md5(project / path) for path in MODELS}


def set_mode(project: Path, mode: str) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["base"]["numerics"] = mode
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_portable_models_keep_their_bytes_under_other_kernels_and_fast_ones_do_not(tmp_path):
    project = copy_project(tmp_path / "project", merge(TINY, {"base": {"numerics": "fast"}}))
    fast = repro(project)
    fast_other = repro(project, "--force", "--single-item", env=OTHER_KERNELS)
    assert all(fast[path] != fast_other[path] for path in MODELS), (fast, fast_other)

    set_mode(project, "portable")
    portable = repro(project)  # the param changed: both stages rerun under the ambient environment
    portable_other = repro(project, "--force", "--single-item", env=OTHER_KERNELS)
    assert portable == portable_other

    perf = json.loads((project / "reports/perf/pretrain.json").read_text())["numerics"]
    assert perf["mode"] == "portable" and perf["torch_isa"] == "AVX2"
    assert OTHER_KERNELS.items() <= perf["replaced"].items()  # what the pin overrode, on record
