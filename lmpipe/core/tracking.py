"""The one tracker: an MLflow run per stage execution, which never takes training down.

Every stage opens `stage_run(...)`. The run carries:
- tags: `lmpipe.core.stage`, `lmpipe.group` (DVC_EXP_NAME, else LMPIPE_RUN_GROUP, else `workspace`),
  the git revision and dirty flag, `dvc.dep.<path>` / `dvc.out.<path>` holding the DVC md5 of
  each input (at start) and output (at the end), so a run can be found from a `dvc.lock` hash;
- params: the flattened params sections the stage reads;
- metrics: buffered and sent in batches (one `log_metric` costs ~30 ms against SQLite).
It ends FINISHED on success, FAILED on an exception, KILLED on SIGTERM or Ctrl-C. A run also
records its owner (`lmpipe.owner.*`: host, pid, process start time); a process killed outright
(SIGKILL, out of memory) cannot close its run, so each stage, before opening its own, closes this
project's RUNNING runs whose owner on this host is gone as KILLED, with `lmpipe.killed_reason`. When the
store cannot be reached, the stage warns once and goes on untracked. Only rank 0 of a
`torchrun` job logs; the other ranks get a tracker that does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import signal
import socket
import threading
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmpipe.core.errors import Terminated
from lmpipe.core.lineage import (
    TAG_GIT_DIRTY,
    TAG_GROUP,
    TAG_KILLED_REASON,
    TAG_OWNER_HOST,
    TAG_OWNER_PID,
    TAG_OWNER_START,
    TAG_PROJECT,
    TAG_STAGE,
    dvc_md5,
    git_state,
    hash_tag,
)
from lmpipe.core.params import flatten
from lmpipe.core.project import default_tracking_uri, project_root

log = logging.getLogger("lmpipe.core.tracking")

# Bounded retries so a dead server costs seconds, not minutes; telemetry off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

FLUSH_EVERY = 200  # buffered metric values per batch request
MAX_PARAM_LEN = 6000  # MLflow's param value limit


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def run_group() -> str:
    """The tag that groups the stage runs of one pipeline run."""
    return os.environ.get("DVC_EXP_NAME") or os.environ.get("LMPIPE_RUN_GROUP") or "workspace"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Tracker:
    """A thin, failure-tolerant handle on one MLflow run (or on nothing)."""

    def __init__(self, client: Any = None, run_id: str | None = None) -> None:
        self._client = client
        self.run_id = run_id
        self._buffer: list[Any] = []

    @property
    def active(self) -> bool:
        return self._client is not None

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if not self.active:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # a tracker that is down never kills the stage
            warnings.warn(f"MLflow {what} failed, tracking off for this stage: {exc}", stacklevel=3)
            self._client = None
            return None

    def set_tags(self, tags: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in tags.items()]
        self._call("set_tags", lambda: self._client.log_batch(self.run_id, tags=items))

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(params.items())]
        for start in range(0, len(items), 100):
            chunk = items[start : start + 100]
            self._call("log_params", lambda: self._client.log_batch(self.run_id, params=chunk))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metrics; they are sent in batches (and always before the run ends)."""
        if not self.active:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            self._buffer.append(Metric(key, float(value), now, step or 0))
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        while self._buffer and self.active:
            chunk, self._buffer = self._buffer[:FLUSH_EVERY], self._buffer[FLUSH_EVERY:]
            self._call("log_metrics", lambda: self._client.log_batch(self.run_id, metrics=chunk))
        self._buffer.clear()

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        path = Path(path)
        fn = self._client.log_artifacts if self.active and path.is_dir() else None
        if fn is None and self.active:
            fn = self._client.log_artifact
        if fn is not None:
            self._call("log_artifact", fn, self.run_id, str(path), artifact_path)

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self._call("log_dict", lambda: self._client.log_dict(self.run_id, obj, artifact_file))

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self._call("log_figure", lambda: self._client.log_figure(self.run_id, figure, artifact_file))

    def log_input(self, path: str | os.PathLike, context: str) -> None:
        """Record a data set input whose digest is its DVC md5 (as in dvc.lock)."""

        def send() -> None:
            from mlflow.data.dataset_source_registry import resolve_dataset_source
            from mlflow.data.meta_dataset import MetaDataset
            from mlflow.entities import InputTag

            with warnings.catch_warnings():  # "source can be interpreted in multiple ways"
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(str(Path(path).resolve()))
            dataset = MetaDataset(source, name=str(path), digest=dvc_md5(path)[:36])
            tags = [InputTag("mlflow.data.context", context)]
            self._client.log_inputs(self.run_id, datasets=[_dataset_input(dataset, tags)])

        self._call("log_input", send)


def _dataset_input(dataset: Any, tags: list[Any]) -> Any:
    from mlflow.entities import DatasetInput

    return DatasetInput(dataset=dataset._to_mlflow_entity(), tags=tags)


def _reachable(uri: str) -> bool:
    """A quick health probe for tracking servers (a file store is always 'reachable')."""
    if not uri.startswith(("http://", "https://")):
        return True

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
            return resp.status == 200
    except OSError:
        return False


def process_start(pid: int) -> str | None:
    """When process `pid` started, as an opaque string; None when it does not exist (or is a zombie).

    Linux: field 22 of /proc/<pid>/stat (clock ticks since boot), exact and cheap. Elsewhere
    psutil's create_time if installed, else "" (then only the pid's existence is checked).
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] in ("Z", "X") else fields[19]
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else _start_without_proc(pid)
    except (OSError, IndexError):
        return _start_without_proc(pid)


def _start_without_proc(pid: int) -> str | None:
    try:
        import psutil
    except ImportError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except OSError:
            pass  # exists, owned by someone else
        return ""
    try:
        return f"{psutil.Process(pid).create_time():.3f}"
    except psutil.Error:
        return None


def owner_tags() -> dict[str, str]:
    """The `lmpipe.owner.*` tags naming this process."""
    return {
        TAG_OWNER_HOST: socket.gethostname(),
        TAG_OWNER_PID: str(os.getpid()),
        TAG_OWNER_START: process_start(os.getpid()) or "",
    }


def owner_alive(pid: int, start: str) -> bool:
    """True when process `pid` on this host is still the one that started at `start`."""
    now = process_start(pid)
    return now is not None and (now == start or "" in (now, start))


def close_orphans(client: Any, project: str) -> list[str]:
    """Close this project's RUNNING runs whose owner on this host is gone as KILLED; their ids.

    Runs of other hosts, and runs without owner tags, are left alone: nothing here can tell
    whether their process still lives.
    """
    host = socket.gethostname()
    query = (
        f"attributes.status = 'RUNNING' and tags.`{TAG_PROJECT}` = '{_quoted(project)}'"
        f" and tags.`{TAG_OWNER_HOST}` = '{_quoted(host)}'"
    )
    experiments = [e.experiment_id for e in client.search_experiments()]
    closed = []
    for run in client.search_runs(experiments, filter_string=query, max_results=1000) if experiments else ():
        tags = run.data.tags
        pid = tags.get(TAG_OWNER_PID, "")
        if not pid.isdigit() or owner_alive(int(pid), tags.get(TAG_OWNER_START, "")):
            continue
        reason = f"owner process {pid} on {host} ended without closing the run (found by pid {os.getpid()})"
        client.set_tag(run.info.run_id, TAG_KILLED_REASON, reason)
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("closed orphaned MLflow run %s (%s) as KILLED: %s", run.info.run_id, run.info.run_name, reason)
        closed.append(run.info.run_id)
    return closed


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _open_run(stage: str, tags: dict[str, str], experiment: str) -> Tracker:
    uri = default_tracking_uri()
    if not _reachable(uri):
        warnings.warn(f"MLflow tracking server {uri} is not reachable; running untracked")
        return Tracker()
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        try:
            close_orphans(client, tags[TAG_PROJECT])
        except Exception as exc:  # housekeeping: never a reason to run untracked
            warnings.warn(f"MLflow: closing orphaned runs failed ({exc})")
        found = client.get_experiment_by_name(experiment)
        exp_id = (
            found.experiment_id
            if found
            else client.create_experiment(experiment, artifact_location=_artifact_location(uri))
        )
        run = client.create_run(exp_id, run_name=stage, tags=tags)
    except Exception as exc:
        warnings.warn(f"MLflow store {uri} failed ({exc}); running untracked")
        return Tracker()
    return Tracker(client, run.info.run_id)


def _resources(started: float) -> dict[str, float]:
    """Wall time of the stage body and the process's peak resident memory (this host)."""

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"stage_seconds": time.monotonic() - started, "peak_rss_mb": peak_kb / 1024}


def _artifact_location(uri: str) -> str | None:
    """For a local store, artifacts go to `<project root>/mlartifacts`, whatever the cwd.

    Without it MLflow uses `./mlruns` of the first run's cwd, which for a `dvc exp run --temp`
    is a temporary folder deleted after the run. A server decides for itself (None).
    """
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (project_root() / "mlartifacts").as_uri()
    return None


def _hash_tags(kind: str, paths: list[str], root: Path) -> dict[str, str]:
    tags = {}
    for rel in paths:
        full = root / rel
        if full.exists():
            tags[hash_tag(kind, rel)] = dvc_md5(full)
    return tags


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Any = None,
    sections: tuple[str, ...] = (),
    inputs: tuple[str, ...] = (),
    outputs: tuple[str, ...] = (),
    extra_tags: dict[str, str] | None = None,
) -> Iterator[Tracker]:
    """Open the MLflow run of one stage execution; close it with the right status.

    `sections` names the params sections the stage reads (flattened into run params; `*` =
    all); `inputs` / `outputs` are project-relative paths whose DVC hashes become tags.
    """
    if not is_rank_zero():
        yield Tracker()
        return
    cwd = Path.cwd()
    git = git_state(cwd)
    tags = {
        TAG_STAGE: stage,
        TAG_GROUP: run_group(),
        TAG_PROJECT: project_root().name,
        "mlflow.source.name": f"stages/{stage.split('@')[0]}",
        TAG_GIT_DIRTY: str(git["dirty"]),
        **owner_tags(),
        **_hash_tags("dep", list(inputs), cwd),
        **(extra_tags or {}),
    }
    if git["rev"]:
        tags["mlflow.source.git.commit"] = git["rev"]
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
    experiment = getattr(getattr(params, "base", None), "experiment", "lmpipe")
    tracker = _open_run(stage, tags, experiment)
    if params is not None:
        dumped = params.model_dump(mode="json")
        chosen = dumped if "*" in sections else {k: dumped[k] for k in ("base", *sections)}
        tracker.log_params(flatten(chosen))

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    started = time.monotonic()
    status = "FAILED"
    try:
        yield tracker
        status = "FINISHED"
    except (Terminated, KeyboardInterrupt) as exc:
        status = "KILLED"
        tracker.set_tags({TAG_KILLED_REASON: f"stopped: {exc or 'interrupted'}"})
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if tracker.active:
            tracker.log_metrics(_resources(started))
            tracker.flush()
            if status == "FINISHED":
                tracker.set_tags(_hash_tags("out", list(outputs), cwd))
            tracker._call("set_terminated", lambda: tracker._client.set_terminated(tracker.run_id, status))


def _main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()
