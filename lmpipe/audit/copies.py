"""Audit a model that left the project: a copied folder, or a model registered in MLflow.

A copy proves where it came from by its bytes. Its files are compared with
1. the lineage it carries (`lineage.json` of an export: every file's md5 at export), which
   catches a file edited after the copy;
2. the outputs recorded in the project's `dvc.lock` and every folder version in its DVC cache:
   the copy may be a whole output (`models/export`) or a sub-folder of one (`models/export/hf`,
   what the registered MLflow model carries). A match names the output and says whether it is
   the version `dvc.lock` records now; the usual audit of that output then follows.

A registered model (`models:/NAME/VERSION`, or `models:/NAME/latest`) is downloaded from the
store and audited as a copy; its run's `dvc.out.models/export` tag is checked too.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import dir_listing, hash_tag, read_lock

REGISTERED_PREFIX = "models:/"
EXPORT_OUT = "models/export"


@dataclass
class CopyMatch:
    """Where a copy's bytes were found: an output, the part of it, and whether dvc.lock holds that version."""

    out: str
    prefix: str
    md5: str
    current: bool


@dataclass
class CopyReport:
    source: str
    files: int
    match: CopyMatch | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def cache_listing(root: Path, md5: str) -> dict[str, str] | None:
    """The per-file md5s DVC's cache stores for a folder hash (`<md5>.dir`), if it holds them."""
    digest = md5.removesuffix(".dir")
    listing = root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / (digest[2:] + ".dir")
    if not listing.exists():
        return None
    return {e["relpath"]: e["md5"] for e in json.loads(listing.read_text(encoding="utf-8"))}


def _carried_lineage(copy: Path, files: dict[str, str]) -> list[str]:
    """Problems between the copy's files and the `lineage.json` it carries (none if it carries none)."""
    path = copy / "lineage.json"
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text(encoding="utf-8")).get("files", {})
    problems = [
        f"{copy / rel}: differs from the md5 in its lineage.json"
        for rel, item in sorted(recorded.items())
        if rel in files and files[rel] != item["md5"]
    ]
    problems += [
        f"{copy / rel}: listed in its lineage.json but missing" for rel in sorted(recorded) if rel not in files
    ]
    return problems


def _folder_versions(root: Path) -> list[tuple[str, str, bool]]:
    """(output path, folder md5, recorded in dvc.lock now) for every folder output and cached version."""
    lock = read_lock(root)
    current = {
        (o["path"], o["md5"]) for e in lock.values() for o in e.get("outs", []) if o.get("md5", "").endswith(".dir")
    }
    versions = [(path, md5, True) for path, md5 in sorted(current)]
    # older versions of the same outputs: any folder listing in the cache whose files match a prefix below
    cached = (root / ".dvc" / "cache" / "files" / "md5").glob("*/*.dir")
    known = {md5 for _, md5 in current}
    for listing in sorted(cached):
        md5 = listing.parent.name + listing.name
        if md5 not in known:
            versions.append(("(a folder in the DVC cache)", md5, False))
    return versions


def find_copy(root: Path, files: dict[str, str]) -> CopyMatch | None:
    """The output version (and the part of it) whose files are exactly the copy's."""
    for out, md5, current in _folder_versions(root):
        listing = cache_listing(root, md5) or (
            {e["relpath"]: e["md5"] for e in dir_listing(root / out)} if current and (root / out).is_dir() else None
        )
        if not listing:
            continue
        prefixes = [""] + sorted({rel.split("/")[0] + "/" for rel in listing if "/" in rel})
        for prefix in prefixes:
            part = {rel[len(prefix) :]: m for rel, m in listing.items() if rel.startswith(prefix)}
            if part == files:
                return CopyMatch(out, prefix.rstrip("/"), md5, current)
    return None


def audit_copy(copy: Path, root: Path, source: str | None = None) -> CopyReport:
    """Compare a folder outside the project with its lineage and the project's outputs."""
    if not copy.is_dir():
        raise LmpipeError(f"{copy}: not a folder (a copied model folder, e.g. of models/export)")
    files = {e["relpath"]: e["md5"] for e in dir_listing(copy)}
    report = CopyReport(source or str(copy), len(files))
    report.problems += _carried_lineage(copy, files)
    report.match = find_copy(root, files)
    if report.match is None:
        report.problems.append(
            f"{report.source}: its {len(files)} files match no output version recorded in "
            f"{root / 'dvc.lock'} or held in its DVC cache"
        )
    elif not report.match.current:
        report.problems.append(
            f"{report.source}: an older version ({report.match.md5}) of an output, not the one "
            f"{root / 'dvc.lock'} records now"
        )
    return report


def _model_version(client: Any, name: str, version: str) -> Any:
    """The registered version (`latest` = the highest number)."""
    if version == "latest":
        found = client.search_model_versions(f"name = '{name}'")
        if not found:
            raise LmpipeError(f"models:/{name}/latest: no registered version of {name!r}")
        return max(found, key=lambda v: int(v.version))
    return client.get_model_version(name, version)


def audit_registered(uri: str, root: Path, tracking_uri: str) -> CopyReport:
    """Download `models:/NAME/VERSION` and audit its transformers folder as a copy of models/export/hf."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name, _, version = uri.removeprefix(REGISTERED_PREFIX).partition("/")
    if not name or not version:
        raise LmpipeError(f"{uri}: expected models:/NAME/VERSION (or models:/NAME/latest)")
    client = MlflowClient(tracking_uri)
    try:
        found = _model_version(client, name, version)
    except mlflow.exceptions.MlflowException as exc:
        raise LmpipeError(f"{uri}: not in the model registry at {tracking_uri} ({exc.message})") from None
    with tempfile.TemporaryDirectory(prefix="lmpipe-audit-") as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{found.version}", dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        hf = next((p for p in local.rglob("config.json") if (p.parent / "lmpipe.json").exists()), None)
        if hf is None:
            raise LmpipeError(f"{uri}: the registered model holds no transformers folder with lmpipe.json")
        report = audit_copy(hf.parent, root, f"{uri} (version {found.version}, run {found.run_id})")
    recorded = client.get_run(found.run_id).data.tags.get(hash_tag("out", EXPORT_OUT)) if found.run_id else None
    lock_md5 = next(
        (o["md5"] for e in read_lock(root).values() for o in e.get("outs", []) if o["path"] == EXPORT_OUT), None
    )
    report.notes.append(f"run {found.run_id} wrote {EXPORT_OUT} {recorded or '(no hash tag)'}; dvc.lock: {lock_md5}")
    if recorded and lock_md5 and recorded != lock_md5:
        report.problems.append(f"{uri}: registered from {EXPORT_OUT} {recorded}, dvc.lock now records {lock_md5}")
    return report


def copy_summary(report: CopyReport) -> dict[str, Any]:
    """The JSON-ready part of the audit report about the copy."""
    match = report.match
    return {
        "source": report.source,
        "files": report.files,
        "notes": report.notes,
        "match": None
        if match is None
        else {"out": match.out, "part": match.prefix, "md5": match.md5, "recorded_in_lock": match.current},
    }


def is_registered(target: str) -> bool:
    return target.startswith(REGISTERED_PREFIX)


def resolve_inside(target: str, root: Path) -> str | None:
    """`target` as a path relative to `root`, or None when it lies outside.

    Absolute paths and paths relative to the working directory are taken as they are; a relative
    path that exists only below `root` (the default `models/export` run from a sub-folder) too.
    """
    path = Path(target).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path if (Path.cwd() / path).exists() or not (root / path).exists() else root / path
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None
