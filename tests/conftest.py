"""Shared fixtures. Every test runs with analytics and telemetry off and no network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def project_root() -> Path:
    return ROOT


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A throw-away SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and far faster on a loaded 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(items):
    """Unit tests first, integration tests last: the session's tiny `dvc repro` runs meanwhile."""
    items.sort(key=lambda item: "integration" in item.keywords)  # stable: order within each kept


@pytest.fixture(scope="session", autouse=True)
def _pipeline_head_start(request, tmp_path_factory):
    """Start the `pipeline` fixture's `dvc repro` before the first test when any test uses it.

    The repro's wall time overlaps the unit tests instead of adding to them; `pipeline` itself
    waits for it, and the session's end stops it if no test waited.
    """
    if not any("pipeline" in getattr(item, "fixturenames", ()) for item in request.session.items):
        yield
        return
    from tests.integration.conftest import start_pipeline, stop_pipeline

    start_pipeline(tmp_path_factory)
    yield
    stop_pipeline()
