"""The tracker's journal: what could not reach MLflow, kept on disk until the store is back.

When the store cannot be reached at a stage's start, or fails mid-run, the Tracker writes each
call it would have made as one JSON line to `<project>/.lmpipe/spool/<local run id>.jsonl`
(artifacts are copied beside it, into `<local run id>/`, so a later change to the file changes
nothing). The first line says which run the rest belongs to: `start` (a run still to create)
or `attach` (a run the store already has); then `params`, `tags`, `metrics` (key, value,
timestamp in ms, step), `artifact`, `dict`, `input`, and `end` (status and end time). A record
with `"run": "pipeline"` is for the run's pipeline (parent) run (lmpipe.core.tracking sends it).

`lmpipe.core.tracking.sync_spool` replays every complete spool once: a created run carries
`lmpipe.spool_id`, so a replay cut short and repeated finds its run instead of making another,
and a replayed spool file is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

SPOOL_DIR = ".lmpipe/spool"
PARAM_CHUNK = 100  # MLflow's log_batch limit on params
METRIC_CHUNK = 200  # buffered metric values per batch request


def spool_dir(root: str | os.PathLike) -> Path:
    return Path(root) / SPOOL_DIR


class Spool:
    """One run's journal: an append-only JSON-lines file and a folder of copied artifacts."""

    def __init__(self, root: str | os.PathLike, local_id: str | None = None) -> None:
        self.local_id = local_id or uuid.uuid4().hex
        self.path = spool_dir(root) / f"{self.local_id}.jsonl"
        self.files = spool_dir(root) / self.local_id
        self._copies = 0

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (artifacts and figures are copied into the spool first)."""
        record = self._portable(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def _copy_target(self, name: str) -> tuple[Path, str]:
        self._copies += 1
        rel = f"{self._copies}/{name}"
        (self.files / str(self._copies)).mkdir(parents=True, exist_ok=True)
        return self.files / rel, rel

    def _portable(self, record: dict[str, Any]) -> dict[str, Any]:
        if record["op"] == "artifact":
            source = Path(record["path"])
            target, rel = self._copy_target(source.name)
            if source.is_dir():
                shutil.copytree(source, target)
            else:
                shutil.copy2(source, target)
            return {**record, "path": rel}
        if record["op"] == "figure":
            artifact = Path(record["artifact_file"])
            target, rel = self._copy_target(artifact.name)
            record["figure"].savefig(target)
            folder = artifact.parent.as_posix()
            return {"op": "artifact", "path": rel, "artifact_path": None if folder == "." else folder}
        return record


def read_spool(path: Path) -> list[dict[str, Any]]:
    """The records of a spool file; a torn last line (a kill in mid-write) is left out."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def apply(client: Any, run_id: str, record: dict[str, Any], files: Path | None = None) -> None:
    """Send one record to run `run_id` (live, or replayed from a spool whose copies are in `files`)."""
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "params":
        items = [Param(k, v) for k, v in sorted(record["params"].items())]
        for start in range(0, len(items), PARAM_CHUNK):
            client.log_batch(run_id, params=items[start : start + PARAM_CHUNK])
    elif op == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in record["tags"].items()])
    elif op == "metrics":
        items = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in record["metrics"]]
        for start in range(0, len(items), METRIC_CHUNK):
            client.log_batch(run_id, metrics=items[start : start + METRIC_CHUNK])
    elif op == "artifact":
        path = Path(files or "") / record["path"]
        log = client.log_artifacts if path.is_dir() else client.log_artifact
        log(run_id, str(path), record.get("artifact_path"))
    elif op == "dict":
        client.log_dict(run_id, record["obj"], record["artifact_file"])
    elif op == "figure":
        client.log_figure(run_id, record["figure"], record["artifact_file"])
    elif op == "input":
        _log_input(client, run_id, record)
    elif op == "end":
        client.set_terminated(run_id, record["status"], end_time=record.get("end_time"))
    else:
        raise ValueError(f"unknown spool record {op!r}")


def _log_input(client: Any, run_id: str, record: dict[str, Any]) -> None:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(record["path"])
    dataset = MetaDataset(source, name=record["name"], digest=record["digest"])
    tags = [InputTag("mlflow.data.context", record["context"])]
    client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)])
