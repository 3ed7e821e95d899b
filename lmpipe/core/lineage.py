"""Lineage in one place: DVC-compatible hashes, the git state, `dvc.lock`, MLflow tag names and look-ups.

Hashes use DVC 3's scheme (md5 of a file; for a folder, md5 of the JSON listing of its files'
md5s, suffixed `.dir`), so a hash logged to MLflow or written in a model card can be compared
with `dvc.lock` and with the files on disk without running DVC.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import subprocess
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmpipe.core.io import load_yaml
from lmpipe.core.project import default_tracking_uri

log = logging.getLogger(__name__)

CHUNK = 1 << 20

# MLflow tags every lineage question reads (`lmpipe audit`, evaluate's upstream links, the README's
# filters); written by lmpipe.core.tracking and the stages.
TAG_STAGE = "lmpipe.stage"  # stage name, `finetune@minilm` for a foreach item
TAG_GROUP = "lmpipe.group"  # one pipeline run (`make repro`) or DVC experiment
TAG_PROJECT = "lmpipe.project"  # the project folder's name
TAG_GIT_DIRTY = "git.dirty"  # uncommitted code changes when the stage ran (DVC's own edits aside)
TAG_BACKBONE = "lmpipe.backbone"  # finetune: the key of finetune.backbones
TAG_COLLAPSED = "lmpipe.collapsed"  # pretrain: the encoder's pooled outputs collapsed
TAG_EXPORT_MODEL = "lmpipe.export.model"  # export: the fine-tuned model it exported
TAG_HEADLINE_MODEL = "lmpipe.headline.model"  # evaluate: the model its headline numbers describe
TAG_REGISTERED_MODEL = "lmpipe.registered_model"
TAG_REGISTERED_VERSION = "lmpipe.registered_version"
TAG_MODEL_URI = "lmpipe.model_uri"
# Who owns a run, so a run whose process died without closing it (SIGKILL, OOM, power loss) can be
# told from a live one and closed as KILLED by the next stage on the same host.
TAG_OWNER_HOST = "lmpipe.owner.host"  # socket.gethostname() of the stage process
TAG_OWNER_PID = "lmpipe.owner.pid"  # its process id
TAG_OWNER_START = "lmpipe.owner.start"  # its start time (/proc/<pid>/stat field 22), so a reused pid is no owner
TAG_KILLED_REASON = "lmpipe.killed_reason"  # why lmpipe closed a run as KILLED
TAG_SPOOL_ID = "lmpipe.spool_id"  # a run made by replaying a spool: its local id, so a second replay finds it
# One parent run per pipeline run (group), the stage runs nested under it, as MLflow's UI shows them.
TAG_KIND = "lmpipe.kind"  # KIND_PIPELINE on a group's parent run, KIND_STAGE on a stage's run
KIND_PIPELINE = "pipeline"
KIND_STAGE = "stage"
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag: a stage run's pipeline run
TAG_CREATED = "lmpipe.created"  # a pipeline run: when it was made (ms), so of two made at once the oldest wins


def hash_tag(kind: str, path: str) -> str:
    """`dvc.dep.<path>` or `dvc.out.<path>`: the tag holding that input's or output's DVC md5."""
    return f"dvc.{kind}.{path}"


def file_md5(path: str | os.PathLike) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_listing(path: str | os.PathLike) -> list[dict[str, str]]:
    """DVC's listing of a folder: one {md5, relpath} per file, sorted by relpath."""
    root = Path(path)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            full = Path(dirpath) / name
            entries.append({"md5": file_md5(full), "relpath": full.relative_to(root).as_posix()})
    return sorted(entries, key=lambda e: e["relpath"])


def dvc_md5(path: str | os.PathLike) -> str:
    """The md5 DVC records for `path` in dvc.lock (`<md5>.dir` for folders)."""
    path = Path(path)
    if path.is_dir():
        listing = json.dumps(dir_listing(path), sort_keys=True).encode("utf-8")
        return hashlib.md5(listing).hexdigest() + ".dir"
    return file_md5(path)


def _git(root: str | os.PathLike, *args: str) -> str | None:
    """`git ARGS` in `root`: its stripped output, or None (no git, not a repository, an error)."""
    try:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_state(root: str | os.PathLike) -> dict[str, Any]:
    """{"rev": commit sha or None, "dirty": bool or None} of the repository at `root`."""
    rev = _git(root, "rev-parse", "HEAD")
    # `dvc repro` itself rewrites dvc.lock, the .gitignore files of outputs and the outputs kept
    # in git (reports, perf files): those edits say nothing about the code that ran.
    outputs = sorted({o["path"] for e in read_lock(root).values() for o in e.get("outs", [])})
    excluded = [":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore", *(f":(exclude){p}" for p in outputs)]
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excluded)
    return {"rev": rev or None, "dirty": None if status is None else bool(status)}


def code_state(root: str | os.PathLike) -> dict[str, Any]:
    """{"rev", "dirty"} of what makes the outputs: the last commit that changed a source the stages
    read (every dep in dvc.lock that no stage writes: code, params, added data; plus dvc.yaml), and
    whether one has uncommitted edits. A commit of only the lock, reports, docs or tests leaves it as
    it was, so a model rebuilt at a later commit records the same revision (same bytes)."""
    lock = read_lock(root)
    outputs = [o["path"] for e in lock.values() for o in e.get("outs", [])]
    deps = {d["path"] for e in lock.values() for d in e.get("deps", [])}
    sources = sorted(p for p in deps if not any(overlaps(p, o) for o in outputs)) + ["dvc.yaml", "params.yaml"]
    rev = _git(root, "log", "-1", "--format=%H", "--", *sources)
    status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", *sources)
    return {"rev": rev or None, "dirty": None if status is None else bool(status)}


def read_lock(root: str | os.PathLike) -> dict[str, Any]:
    """The `stages` mapping of `<root>/dvc.lock` ({} when the pipeline never ran)."""
    lock = Path(root) / "dvc.lock"
    if not lock.exists():
        return {}
    return (load_yaml(lock.read_text(encoding="utf-8")) or {}).get("stages", {})


def overlaps(a: str, b: str) -> bool:
    """True when one project-relative path is the other or lies inside it."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def upstream_stages(lock: dict[str, Any], paths: Any) -> list[str]:
    """The stages that produced `paths` and, transitively, their inputs; in dvc.lock order."""
    frontier = list(paths)
    found: set[str] = set()
    while frontier:
        path = frontier.pop()
        for name, entry in lock.items():
            if name not in found and any(overlaps(path, o["path"]) for o in entry.get("outs", [])):
                found.add(name)
                frontier.extend(dep["path"] for dep in entry.get("deps", []))
    return [name for name in lock if name in found]


# --------------------------------------------------------------------------- MLflow look-ups
def producer_runs(
    client: Any, experiment_ids: list[str], path: str, md5: str, *, finished_only: bool = False, max_results: int = 20
) -> list[Any]:
    """Runs that wrote `path` with content `md5` (its `dvc.out.<path>` tag), newest first."""
    query = f"tags.`{hash_tag('out', path)}` = '{md5}'"
    if finished_only:
        query += " and attributes.status = 'FINISHED'"
    return list(
        client.search_runs(
            experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"], max_results=max_results
        )
    )


def find_producer_run(client: Any, experiment_id: str, path: str, md5: str) -> Any:
    """The latest FINISHED run of `experiment_id` that wrote `path` with content `md5`, or None."""
    runs = producer_runs(client, [experiment_id], path, md5, finished_only=True, max_results=1)
    return runs[0] if runs else None


def upstream_tags(experiment: str, paths: Sequence[str], tracking_uri: str | None = None) -> dict[str, str]:
    """`upstream.<stage>.run_id` tags for the runs that produced `paths` (in their current state).

    Best effort: a store that fails gives {} and a warning, never an error.
    """
    tags: dict[str, str] = {}
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri or default_tracking_uri())
        found = client.get_experiment_by_name(experiment)
        for path in paths if found is not None else ():
            if not Path(path).exists():
                continue
            run = find_producer_run(client, found.experiment_id, path, dvc_md5(path))
            if run is None:
                log.info("no finished MLflow run has %s in its current state", path)
                continue
            stage = run.data.tags.get(TAG_STAGE) or Path(path).name
            key = re.sub(r"[^\w.-]", ".", stage)  # finetune@minilm -> finetune.minilm ('@' is no tag key)
            tags[f"upstream.{key}.run_id"] = run.info.run_id
    except Exception as exc:  # lineage tags are a convenience: never fail the stage for them
        warnings.warn(f"MLflow upstream lookup failed ({exc}); no upstream tags")
    return tags
