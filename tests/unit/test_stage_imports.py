"""The stages that need no transformer never load one: fetch, preprocess and baseline start fast.

The three stages run for real, one after the other in ONE process (a scratch project: a CSV
sample, `fetch.source: file`, its own SQLite MLflow store, so the tracker's own imports count
too); at exit the process lists the modules it ever imported. Importing torch or transformers
costs seconds per process (transformers 8-9 s on 2 cores) and none of these stages needs them.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench import startup
from tests.conftest import ROOT

HEAVY = ("torch", "transformers", "peft", "onnxruntime", "tokenizers")
RUNNER = """
import atexit, json, runpy, sys
sys.path.insert(0, sys.argv[1])
atexit.register(lambda: open(sys.argv[2], "w").write(json.dumps(sorted(sys.modules))))
for module in ("stages.fetch", "stages.preprocess", "stages.baseline"):
    runpy.run_module(module, run_name="__main__")
"""


def test_fetch_preprocess_and_baseline_never_import_a_transformer(tmp_path):
    project, env = startup.scratch_project(ROOT, tmp_path / "project", {"rows": 60, "seed": 0, "tracking": "sqlite"})
    listing = tmp_path / "modules.json"
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(ROOT), str(listing)], cwd=project, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (project / "models" / "baseline" / "model.json").is_file()  # all three ran to the end
    assert "mlflow" in json.loads(listing.read_text())  # the tracker's thread ran its imports too
    loaded = {name.split(".")[0] for name in json.loads(listing.read_text())}
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))
