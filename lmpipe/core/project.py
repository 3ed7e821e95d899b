"""Where the project lives, resolved the same way from a workspace run and a DVC temp run."""

from __future__ import annotations

import os
from pathlib import Path


def project_root(start: str | os.PathLike | None = None) -> Path:
    """The outermost folder above `start` (default: cwd) that holds a `.dvc` directory.

    `dvc exp run --temp` and `--queue` execute in `<root>/.dvc/tmp/exps/<tmp>/`, which has a
    `.dvc` of its own; taking the outermost one maps those runs back to the user's project, so
    they log to the same MLflow store. Without any `.dvc` above, the start folder itself.
    """
    here = Path(start or os.getcwd()).resolve()
    found = None
    for folder in (here, *here.parents):
        if (folder / ".dvc").is_dir():
            found = folder
    return found or here


def default_tracking_uri(start: str | os.PathLike | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else an absolute `sqlite:///<project root>/mlflow.db`."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{project_root(start) / 'mlflow.db'}"
