"""The one tracker: an MLflow run per stage execution, which never takes training down.

Every stage opens `stage_run(...)`. The run carries:
- tags: `lmpipe.stage`, `lmpipe.group` (DVC_EXP_NAME, else LMPIPE_RUN_GROUP, else `workspace`),
  `lmpipe.kind=stage`, the git revision and dirty flag, `dvc.dep.<path>` / `dvc.out.<path>`
  holding the DVC md5 of each input (at start) and output (at the end), so a run can be found from
  a `dvc.lock` hash;
- params: the flattened params sections the stage reads;
- metrics: buffered and sent in batches (one `log_metric` costs ~30 ms against SQLite).
It ends FINISHED on success, FAILED on an exception, KILLED on SIGTERM or Ctrl-C. A run also
records its owner (`lmpipe.owner.*`: host, pid, process start time); a process killed outright
(SIGKILL, out of memory) cannot close its run, so each stage, before opening its own, closes this
project's RUNNING runs whose owner on this host is gone as KILLED, with `lmpipe.killed_reason`. When the
store cannot be reached, at the start or mid-run, the stage warns once and goes on, journaling
what it would have sent to `<project>/.lmpipe/spool/` (lmpipe.core.spool); the next stage that
reaches the store, or `lmpipe sync`, sends it (`sync_spool`). Only rank 0 of a
`torchrun` job logs; the other ranks get a tracker that does nothing.

The stage runs of one pipeline run (one group) are nested under one parent run, as MLflow's UI
shows them: the pipeline run, named after the group, tagged `lmpipe.kind=pipeline`, `lmpipe.group`,
`lmpipe.project` (no owner tags: no stage owns it), starting 1 ms before its first stage. A
stage's open finds it by those tags or makes it (two made at once: the first made wins, the other
is deleted) and sets it RUNNING; each stage's end gives it that stage's status and end time (a
replayed older stage does not move it back). `Tracker.log_to_pipeline` sends numbers to it as
well, with the params the stage run logged: evaluate's headline makes it the pipeline's row in the
UI's table. A spool replayed later nests its run under its group's parent, made then if need be;
`nest_flat_runs` nests the runs of a store made before nesting existed. The experiment is tagged
`mlflow.experimentKind=custom_model_development` (MLflow's "Machine learning" kind).

Opening the run costs seconds (importing MLflow ~3 s, the store, the git state, the input hashes,
the housekeeping), so it happens in a background thread while the stage already works: what the
stage logs meanwhile is held in order (artifacts copied, dicts deep-copied) and sent the moment
the run is open; `run_id` and `active` wait for it, and so does the end of the stage. A failure
of the open itself is handled as before (journal to the spool, or run untracked with a warning).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import resource
import shutil
import signal
import socket
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmpipe.core import numerics
from lmpipe.core.errors import Terminated
from lmpipe.core.lineage import (
    KIND_PIPELINE,
    KIND_STAGE,
    TAG_CREATED,
    TAG_GIT_DIRTY,
    TAG_GROUP,
    TAG_HEADLINE_MODEL,
    TAG_KILLED_REASON,
    TAG_KIND,
    TAG_OWNER_HOST,
    TAG_OWNER_PID,
    TAG_OWNER_START,
    TAG_PARENT_RUN,
    TAG_PROJECT,
    TAG_SPOOL_ID,
    TAG_STAGE,
    dvc_md5,
    git_state,
    hash_tag,
)
from lmpipe.core.params import flatten
from lmpipe.core.project import default_tracking_uri, project_root
from lmpipe.core.spool import METRIC_CHUNK, Spool, apply, read_spool, spool_dir
from lmpipe.core.stage import work_started

log = logging.getLogger("lmpipe.core.tracking")

# Bounded retries so a dead server costs seconds, not minutes; telemetry off.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

FLUSH_EVERY = METRIC_CHUNK  # buffered metric values per batch request
MAX_PARAM_LEN = 6000  # MLflow's param value limit
# MLflow's experiment kind tag; "custom_model_development" is its "Machine learning" kind (the
# training-runs table), "genai_development" its GenAI one (traces and the GenAI overview)
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
PIPELINE = "pipeline"  # a record's "run" when it goes to the pipeline (parent) run


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated(f"signal {signum}")


def run_group() -> str:
    """The tag that groups the stage runs of one pipeline run."""
    return os.environ.get("DVC_EXP_NAME") or os.environ.get("LMPIPE_RUN_GROUP") or "workspace"


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


class Tracker:
    """A thin, failure-tolerant handle on one MLflow run, on a spool journal of it, or on nothing.

    Every call becomes a record (lmpipe.core.spool) sent to the store; when a send fails, the
    tracker warns once and journals that record and the rest of the run to its spool (when it has
    a project to keep one in), so an outage loses nothing; `lmpipe sync` sends it later. A record
    marked `"run": "pipeline"` goes to the run's pipeline (parent) run instead.
    """

    def __init__(
        self, client: Any = None, run_id: str | None = None, spool: Spool | None = None, parent_id: str | None = None
    ) -> None:
        self._client = client
        self._run_id = run_id
        self._parent_id = parent_id  # the pipeline run this run is nested under
        self._params: dict[str, str] = {}  # what log_params sent, for log_to_pipeline
        self._buffer: list[list[Any]] = []
        self.spool = spool  # set: journaling (from the start, or after a failed send)
        self._spool_root: Path | None = None  # where to open a spool if the store fails mid-run
        self._lock = threading.Lock()  # one record at a time, in order, from any thread
        self._opening: threading.Thread | None = None
        self._pending: list[dict[str, Any]] | None = None  # records logged while the run opens
        self._pending_dir: Path | None = None  # copies of the artifacts among them

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits for a run still opening)."""
        self.wait_open()
        return self._run_id

    @property
    def active(self) -> bool:
        """True while a live MLflow client backs this tracker (waits for a run still opening)."""
        self.wait_open()
        return self._client is not None

    @property
    def recording(self) -> bool:
        """True while what is logged goes somewhere (the store, the spool, or the run being opened)."""
        return self._pending is not None or self._client is not None or self.spool is not None

    def open_in_background(self, opener: Callable[[], Tracker]) -> None:
        """Open the run with `opener` in a thread; hold what is logged until it is open, then send it."""
        self._pending = []

        def target() -> None:
            try:
                opened = opener()
            except Exception as exc:  # a tracker never kills the stage
                warnings.warn(f"MLflow: opening the run failed, tracking off for this stage: {exc}")
                opened = Tracker()
            self._adopt(opened)

        self._opening = threading.Thread(target=target, name="lmpipe-tracker-open", daemon=True)
        self._opening.start()

    def wait_open(self) -> None:
        """Block until a run opened in the background is open and what was held meanwhile is sent."""
        thread = self._opening
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _adopt(self, opened: Tracker) -> None:
        with self._lock:
            self._client, self._run_id, self.spool = opened._client, opened._run_id, opened.spool
            self._parent_id = opened._parent_id
            self._spool_root = opened._spool_root
            pending, self._pending = self._pending or [], None
            for record in pending:
                self._send(record)
        if self._pending_dir is not None:
            shutil.rmtree(self._pending_dir, ignore_errors=True)

    def _hold(self, record: dict[str, Any]) -> dict[str, Any]:
        """A record that stays true until sent: artifacts and figures copied now, dicts deep-copied."""
        if record["op"] == "dict":
            return {**record, "obj": copy.deepcopy(record["obj"])}
        if record["op"] not in ("artifact", "figure"):
            return record
        if self._pending_dir is None:
            self._pending_dir = Path(tempfile.mkdtemp(prefix="lmpipe-tracker-"))
        folder = self._pending_dir / str(len(self._pending or ()))
        folder.mkdir()
        if record["op"] == "figure":
            artifact = Path(record["artifact_file"])
            record["figure"].savefig(folder / artifact.name)
            parent = artifact.parent.as_posix()
            target = str(folder / artifact.name)
            return {"op": "artifact", "path": target, "artifact_path": None if parent == "." else parent}
        source = Path(record["path"])
        target = folder / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return {**record, "path": str(target)}

    def _emit(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._pending is None:
                self._send(record)
                return
            try:
                self._pending.append(self._hold(record))
            except Exception as exc:  # e.g. an artifact that is not there: never a reason to stop
                warnings.warn(f"MLflow: {record['op']} record dropped, it could not be kept: {exc}", stacklevel=3)

    def _send(self, record: dict[str, Any]) -> None:
        if self._client is not None:
            try:
                _deliver(self._client, self._run_id, self._parent_id, record)
                return
            except Exception as exc:  # a tracker that is down never kills the stage
                self._client = None
                self._go_offline(record["op"], exc)
        if self.spool is not None:
            try:
                self.spool.write(record)
            except Exception as exc:  # nor does a spool that cannot be written
                warnings.warn(f"MLflow spool {self.spool.path} failed, tracking off for this stage: {exc}")
                self.spool = None

    def _go_offline(self, op: str, exc: Exception) -> None:
        if self._spool_root is None or self._run_id is None:
            warnings.warn(f"MLflow {op} failed, tracking off for this stage: {exc}", stacklevel=4)
            return
        self.spool = Spool(self._spool_root)
        warnings.warn(
            f"MLflow {op} failed ({exc}); journaling the rest of run {self._run_id} to {self.spool.path}"
            " (`lmpipe sync` or the next stage sends it)",
            stacklevel=4,
        )
        self.spool.write({"op": "attach", "run_id": self._run_id, "owner": owner_tags()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        if self.recording and tags:
            self._emit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_params(self, params: dict[str, Any]) -> None:
        if self.recording and params:
            values = {k: str(v)[:MAX_PARAM_LEN] for k, v in sorted(params.items())}
            self._params.update(values)
            self._emit({"op": "params", "params": values})

    def log_to_pipeline(self, metrics: dict[str, float], tags: dict[str, Any] | None = None) -> None:
        """Send `metrics` (and `tags`) to the pipeline run too, with every param this run logged.

        What one pipeline run's row in the UI's table shows (evaluate: the headline). A param the
        pipeline run already has with another value keeps its first value (MLflow params never change).
        """
        if not self.recording:
            return
        if self._params:
            self._emit({"op": "params", "params": dict(self._params), "run": PIPELINE})
        if tags:
            self._emit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}, "run": PIPELINE})
        now = int(time.time() * 1000)
        values = [[key, float(value), now, 0] for key, value in metrics.items()]
        if values:
            self._emit({"op": "metrics", "metrics": values, "run": PIPELINE})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Queue metrics; they are sent in batches (and always before the run ends)."""
        if not self.recording:
            return
        now = int(time.time() * 1000)
        self._buffer.extend([key, float(value), now, step or 0] for key, value in metrics.items())
        if len(self._buffer) >= FLUSH_EVERY:
            self.flush()

    def flush(self) -> None:
        if self._buffer and self.recording:
            self._emit({"op": "metrics", "metrics": self._buffer})
        self._buffer = []

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        if self.recording:
            self._emit({"op": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        if self.recording:
            self._emit({"op": "dict", "obj": obj, "artifact_file": artifact_file})

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        if self.recording:
            self._emit({"op": "figure", "figure": figure, "artifact_file": artifact_file})

    def log_input(self, path: str | os.PathLike, context: str) -> None:
        """Record a data set input whose digest is its DVC md5 (as in dvc.lock)."""
        if self.recording:
            full = str(Path(path).resolve())
            self._emit(
                {"op": "input", "path": full, "name": str(path), "digest": dvc_md5(path)[:36], "context": context}
            )

    def end(self, status: str) -> None:
        if self.recording:
            self._emit({"op": "end", "status": status, "end_time": int(time.time() * 1000)})


def reachable(uri: str) -> bool:
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

    Runs of other hosts, and runs without owner tags (pipeline runs among them), are left alone:
    nothing here can tell whether their process still lives. The pipeline run of a closed run
    ends KILLED with it (unless a later stage ended it since).
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
        if tags.get(TAG_PARENT_RUN):
            _end_pipeline(client, tags[TAG_PARENT_RUN], "KILLED", _now_ms())
        log.warning("closed orphaned MLflow run %s (%s) as KILLED: %s", run.info.run_id, run.info.run_name, reason)
        closed.append(run.info.run_id)
    return closed


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _open_run(stage: str, tags: dict[str, str], experiment: str, start_ms: int | None = None) -> Tracker:
    """Open the run (start time `start_ms`, default now); a spool journal when the store fails."""
    uri, root = default_tracking_uri(), project_root()
    start_ms = start_ms or _now_ms()
    start = {"op": "start", "experiment": experiment, "run_name": stage, "tags": tags, "start_time": start_ms}
    if not reachable(uri):
        return _offline(root, start, f"MLflow tracking server {uri} is not reachable")
    try:
        import mlflow
        from mlflow.tracking import MlflowClient

        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        _housekeeping(client, uri, tags[TAG_PROJECT], root)
        exp_id = _experiment_id(client, experiment, uri)
        parent = pipeline_run(client, exp_id, tags[TAG_GROUP], tags[TAG_PROJECT], start_ms)
        client.update_run(parent, status="RUNNING")
        nested = {**tags, TAG_PARENT_RUN: parent}
        run = client.create_run(exp_id, start_time=start_ms, tags=nested, run_name=stage)
    except Exception as exc:
        return _offline(root, start, f"MLflow store {uri} failed ({exc})")
    tracker = Tracker(client, run.info.run_id, parent_id=parent)
    tracker._spool_root = root
    return tracker


def _now_ms() -> int:
    return int(time.time() * 1000)


def _offline(root: Path, start: dict[str, Any], why: str) -> Tracker:
    """A tracker that journals the whole run to a new spool (or, if even that fails, does nothing)."""
    spool = Spool(root)
    try:
        spool.write(start)
    except Exception as exc:
        warnings.warn(f"{why}; running untracked (and the spool {spool.path} failed: {exc})", stacklevel=3)
        return Tracker()
    warnings.warn(f"{why}; running untracked, journaled to {spool.path} (`lmpipe sync` sends it)", stacklevel=3)
    return Tracker(spool=spool)


def _experiment_id(client: Any, experiment: str, uri: str) -> str:
    """The id of `experiment`, created if need be, tagged as a training ("Machine learning") experiment."""
    found = mark_training_experiment(client, experiment)  # one made by an older lmpipe, or by MLflow itself
    if found is not None:
        return found
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    return client.create_experiment(experiment, artifact_location=_artifact_location(uri), tags=tags)


def _housekeeping(client: Any, uri: str, project: str, root: Path) -> None:
    """Before a stage opens its run: send what earlier runs spooled, then close orphaned runs."""
    try:
        sync_spool(client, uri, root)
    except Exception as exc:  # housekeeping: never a reason to run untracked
        warnings.warn(f"MLflow: replaying the spool in {spool_dir(root)} failed ({exc}); it is kept")
    try:
        close_orphans(client, project)
    except Exception as exc:
        warnings.warn(f"MLflow: closing orphaned runs failed ({exc})")


def sync_spool(client: Any, uri: str, root: str | os.PathLike) -> list[str]:
    """Replay every finished spool under `root` into the store, once; the ids of the runs sent to.

    A spool still being written (no `end` record, its process alive on this host) is left alone;
    one whose process died without an `end` closes its run as KILLED. A replayed spool is removed.
    """
    sent = []
    for path in sorted(spool_dir(root).glob("*.jsonl")):
        records = read_spool(path)
        ended = bool(records) and records[-1]["op"] == "end"
        head = records[0] if records else {}
        owner = head.get("owner") or head.get("tags") or {}  # attach: owner; start: the run's owner tags
        pid = str(owner.get(TAG_OWNER_PID, ""))
        mine = owner.get(TAG_OWNER_HOST) == socket.gethostname() and pid.isdigit()
        if not ended and mine and owner_alive(int(pid), owner.get(TAG_OWNER_START, "")):
            continue
        files = path.with_suffix("")
        if records:
            run_id, parent = _spool_target(client, uri, records[0], path.stem)
            for record in records[1:]:
                _deliver(client, run_id, parent, record, files, replay=True)
            _close_replayed(client, run_id, parent, records[-1] if ended else None)
            sent.append(run_id)
            log.info("sent spooled run %s (%s) to %s", run_id, path.name, uri)
        path.unlink()
        shutil.rmtree(files, ignore_errors=True)
    return sent


def _spool_target(client: Any, uri: str, head: dict[str, Any], local_id: str) -> tuple[str, str | None]:
    """The run a spool's records go to (the attached one, the one an earlier replay made, or a new one
    nested under its group's pipeline run) and that pipeline run (None for a run made before nesting)."""
    if head["op"] == "attach":
        run = client.get_run(head["run_id"])
        return run.info.run_id, run.data.tags.get(TAG_PARENT_RUN)
    exp_id = _experiment_id(client, head["experiment"], uri)
    query = f"tags.`{TAG_SPOOL_ID}` = '{local_id}'"
    found = client.search_runs([exp_id], filter_string=query, max_results=1)
    if found:
        return found[0].info.run_id, found[0].data.tags.get(TAG_PARENT_RUN)
    tags = {**head["tags"], TAG_SPOOL_ID: local_id}
    parent = None
    if TAG_GROUP in tags and TAG_PROJECT in tags:
        group, project = tags[TAG_GROUP], tags[TAG_PROJECT]
        parent = tags[TAG_PARENT_RUN] = pipeline_run(client, exp_id, group, project, head["start_time"])
    run = client.create_run(exp_id, start_time=head["start_time"], tags=tags, run_name=head["run_name"])
    return run.info.run_id, parent


def _close_replayed(client: Any, run_id: str, parent: str | None, end: dict[str, Any] | None) -> None:
    if end is None:
        reason = "its process ended while the store was unreachable, without closing the run (replayed from the spool)"
        client.set_tag(run_id, TAG_KILLED_REASON, reason)
        client.set_terminated(run_id, "KILLED")
        if parent is not None:
            _end_pipeline(client, parent, "KILLED", client.get_run(run_id).info.end_time)
    elif end["status"] != "KILLED" and TAG_KILLED_REASON in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, TAG_KILLED_REASON)  # closed as an orphan meanwhile; the spool knows better


# --------------------------------------------------------------------------- pipeline (parent) runs
def pipeline_run(client: Any, experiment_id: str, group: str, project: str, first_start_ms: int) -> str:
    """The id of the pipeline run of `group`: found by its tags, else made, starting 1 ms before
    `first_start_ms` (its first stage's start: newest-first searches list the stage runs first).

    Stages of one group run one after another, but two processes may still make it at once (a
    replay and a stage, a second host): each then looks again and keeps the one made first (tag
    `lmpipe.created`, then the id: the same choice for everyone); the other deletes its own.
    """
    found = _pipeline_runs(client, experiment_id, group, project)
    if found:
        return found[0].info.run_id
    tags = {TAG_KIND: KIND_PIPELINE, TAG_GROUP: group, TAG_PROJECT: project, TAG_CREATED: str(_now_ms())}
    mine = client.create_run(experiment_id, start_time=first_start_ms - 1, tags=tags, run_name=group).info.run_id
    winner = next((r.info.run_id for r in _pipeline_runs(client, experiment_id, group, project)), mine)
    if winner != mine:
        client.delete_run(mine)
        log.info("pipeline run of %s: another process made %s at the same time; deleted mine, %s", group, winner, mine)
    return winner


def _pipeline_runs(client: Any, experiment_id: str, group: str, project: str) -> list[Any]:
    """The live pipeline runs of `group`, the one made first first."""
    query = (
        f"tags.`{TAG_KIND}` = '{KIND_PIPELINE}' and tags.`{TAG_GROUP}` = '{_quoted(group)}'"
        f" and tags.`{TAG_PROJECT}` = '{_quoted(project)}'"
    )
    runs = client.search_runs([experiment_id], filter_string=query, max_results=100)
    return sorted(runs, key=lambda r: (int(r.data.tags.get(TAG_CREATED) or 0), r.info.run_id))


def _deliver(
    client: Any,
    run_id: str,
    parent: str | None,
    record: dict[str, Any],
    files: Path | None = None,
    replay: bool = False,
) -> None:
    """Send one record to the stage's run, or (`"run": "pipeline"`) to its pipeline run; a stage's end
    also ends the pipeline run. Replayed, what the pipeline run refuses is a warning, not a stuck spool."""
    to_pipeline = record.get("run") == PIPELINE
    if not to_pipeline:
        apply(client, run_id, record, files)
    if parent is None or not (to_pipeline or record["op"] == "end"):
        return
    try:
        if to_pipeline:
            _to_pipeline(client, parent, record, files)
        else:
            _end_pipeline(client, parent, record["status"], record.get("end_time"))
    except Exception as exc:
        if not replay:
            raise
        warnings.warn(f"MLflow: pipeline run {parent} refused a replayed {record['op']} record ({exc}); skipped")


def _to_pipeline(client: Any, parent: str, record: dict[str, Any], files: Path | None = None) -> None:
    """Send a record to a pipeline run; params it already has keep their value (MLflow's params never change)."""
    if record["op"] == "params":
        have = client.get_run(parent).data.params
        changed = sorted(k for k, v in record["params"].items() if k in have and have[k] != v)
        if changed:
            log.warning(
                "pipeline run %s keeps its first value of %d param(s) that changed since, e.g. %s"
                " (a new group gives a new pipeline run: LMPIPE_RUN_GROUP, `make repro`, `dvc exp run`)",
                parent,
                len(changed),
                changed[0],
            )
        record = {**record, "params": {k: v for k, v in record["params"].items() if k not in have}}
        if not record["params"]:
            return
    apply(client, parent, record, files)


def _end_pipeline(client: Any, parent: str, status: str, end_time: int | None) -> None:
    """A stage ended: its pipeline run takes that status and end time, unless a later stage ended it since."""
    info = client.get_run(parent).info
    if end_time is not None and info.end_time and info.end_time > end_time:
        return  # a replayed older stage
    client.set_terminated(parent, status, end_time=end_time)


def nest_flat_runs(client: Any, experiment_id: str) -> dict[str, str]:
    """Nest the stage runs of a store made before nesting existed under their groups' pipeline runs.

    Each group's pipeline run (found or made, starting with its first stage) takes the status and
    end time of its last stage, unless one still runs, and the params, headline metrics and model of
    its latest finished evaluate run. Runs already nested are left alone. {group: pipeline run id}
    of the groups it nested runs of.
    """
    nested = {}
    for (project, group), runs in flat_runs(client, experiment_id).items():
        parent = pipeline_run(client, experiment_id, group, project, min(r.info.start_time for r in runs))
        for run in runs:
            client.set_tag(run.info.run_id, TAG_PARENT_RUN, parent)
        evaluate = [
            r for r in runs if r.data.tags[TAG_STAGE] == "evaluate" and r.info.status == "FINISHED" and r.data.metrics
        ]
        if evaluate:
            latest = max(evaluate, key=lambda r: r.info.end_time or 0)
            headline = {k: v for k, v in latest.data.metrics.items() if k.startswith("headline.")}
            _to_pipeline(client, parent, {"op": "params", "params": dict(latest.data.params)})
            if TAG_HEADLINE_MODEL in latest.data.tags:
                client.set_tag(parent, TAG_HEADLINE_MODEL, latest.data.tags[TAG_HEADLINE_MODEL])
            stamp = latest.info.end_time or _now_ms()
            _to_pipeline(client, parent, {"op": "metrics", "metrics": [[k, v, stamp, 0] for k, v in headline.items()]})
        if any(r.info.status == "RUNNING" for r in runs):
            client.update_run(parent, status="RUNNING")
        else:
            last = max(runs, key=lambda r: r.info.end_time or 0)
            _end_pipeline(client, parent, last.info.status, last.info.end_time)
        nested[group] = parent
    return nested


def flat_runs(client: Any, experiment_id: str) -> dict[tuple[str, str], list[Any]]:
    """The stage runs nested under no pipeline run, by (project, group)."""
    flat: dict[tuple[str, str], list[Any]] = {}
    for run in _all_runs(client, experiment_id):
        tags = run.data.tags
        if TAG_STAGE in tags and TAG_GROUP in tags and TAG_PARENT_RUN not in tags:
            flat.setdefault((tags.get(TAG_PROJECT, ""), tags[TAG_GROUP]), []).append(run)
    return flat


def _all_runs(client: Any, experiment_id: str) -> Iterator[Any]:
    """Every live run of the experiment, page by page."""
    token = None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def mark_training_experiment(client: Any, experiment: str) -> str | None:
    """Tag `experiment` as a training ("Machine learning") experiment if it is not; its id, or None if absent."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    if EXPERIMENT_KIND_TAG not in found.tags:
        client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return found.experiment_id


def _resources(started: float, startup: float | None = None) -> dict[str, float]:
    """Wall time of the stage body, the process's peak resident memory (this host) and its start-up."""

    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    measured = {"stage_seconds": time.monotonic() - started, "peak_rss_mb": peak_kb / 1024}
    return measured if startup is None else {**measured, "startup_seconds": startup}


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


def _start_tags(stage: str, inputs: tuple[str, ...], extra_tags: dict[str, str] | None, cwd: Path) -> dict[str, str]:
    """The tags a run starts with: stage, group, project, git state, owner, input hashes, extras."""
    git = git_state(cwd)
    tags = {
        TAG_STAGE: stage,
        TAG_GROUP: run_group(),
        TAG_PROJECT: project_root().name,
        TAG_KIND: KIND_STAGE,
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
    all); `inputs` / `outputs` are project-relative paths whose DVC hashes become tags. The run
    opens in a background thread (see the module docstring): the body starts at once.
    """
    if not is_rank_zero():
        yield Tracker()
        return
    cwd = Path.cwd()
    numerics.record()  # in portable mode, kernels that escaped the pin stop the stage before work
    experiment = getattr(getattr(params, "base", None), "experiment", "lmpipe")
    tracker, start_ms = Tracker(), _now_ms()  # the run starts when the stage does, not when it is open
    tracker.open_in_background(
        lambda: _open_run(stage, _start_tags(stage, inputs, extra_tags, cwd), experiment, start_ms)
    )
    if _creates_store(default_tracking_uri()):
        tracker.wait_open()  # a kill while the schema is half made would leave a store no one can open
    if params is not None:
        dumped = params.model_dump(mode="json")
        chosen = dumped if "*" in sections else {k: dumped[k] for k in ("base", *sections)}
        tracker.log_params(flatten(chosen))

    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    started = time.monotonic()
    startup = work_started(stage)
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
        tracker.wait_open()
        if tracker.recording:
            tracker.log_metrics(_resources(started, startup))
            tracker.flush()
            if status == "FINISHED":
                tracker.set_tags({**_hash_tags("out", list(outputs), cwd), **numerics.tags(numerics.record())})
            tracker.end(status)


def _creates_store(uri: str) -> bool:
    """Whether opening a run on `uri` first creates the store (a local SQLite file not there yet)."""
    prefix = "sqlite:///"
    return uri.startswith(prefix) and not Path(uri[len(prefix) :]).exists()


def _main_thread() -> bool:

    return threading.current_thread() is threading.main_thread()
