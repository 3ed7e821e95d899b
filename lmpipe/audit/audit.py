"""`lmpipe audit`: how exactly was this model made, and do the bytes on disk still prove it?

From `dvc.lock` it walks back from an output (default `models/export`) to the raw data and
reports, for every stage on the way: the command, the params it ran with, the md5 of each input
and output as recorded, and the md5 recomputed from disk now. It adds the git revision and the
package versions recorded at export (`lineage.json` beside the model) and the MLflow runs whose
`dvc.out.*` tags carry the recorded hashes.

It fails (exit 1) when a recorded file no longer matches (naming the file inside a folder when
DVC's cache still holds the folder's listing), when an output is missing, or when a stage is
stale: its params or code changed since it ran, so the artifact no longer follows from the
workspace. Outputs DVC does not cache (`cache: false`, e.g. checkpoints) are reported when
absent but not required.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lmpipe.audit import copies
from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import load_yaml
from lmpipe.core.lineage import (
    TAG_GROUP,
    TAG_STAGE,
    code_state,
    dir_listing,
    dvc_md5,
    producer_runs,
    read_lock,
    upstream_stages,
)
from lmpipe.core.project import project_root


@dataclass
class Check:
    """One recorded path compared with the disk."""

    kind: str  # dep | out
    path: str
    recorded: str | None
    actual: str | None
    status: str  # ok | changed | missing | not-stored
    detail: str = ""


@dataclass
class StageReport:
    name: str
    cmd: str
    params: dict[str, Any]
    checks: list[Check] = field(default_factory=list)
    stale_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlflow_runs: list[dict[str, str]] = field(default_factory=list)


def lineage_chain(lock: dict[str, Any], target: str) -> list[str]:
    """Every stage `target` depends on, itself included, in dvc.lock order."""
    chain = upstream_stages(lock, [target])
    if not chain:
        known = sorted({o["path"] for e in lock.values() for o in e.get("outs", [])})
        raise LmpipeError(f"{target}: no stage in dvc.lock produced it (outputs: {known})")
    return chain


def _explain_dir_change(root: Path, path: str, recorded: str) -> str:
    before = copies.cache_listing(root, recorded)
    if before is None:
        return "folder contents differ (DVC cache has no listing to name the file)"
    now = {e["relpath"]: e["md5"] for e in dir_listing(root / path)}
    changed = sorted(p for p in before.keys() & now.keys() if before[p] != now[p])
    removed = sorted(before.keys() - now.keys())
    added = sorted(now.keys() - before.keys())
    parts = [f"{path}/{p} changed" for p in changed]
    parts += [f"{path}/{p} removed" for p in removed] + [f"{path}/{p} added" for p in added]
    return "; ".join(parts) or "folder contents differ"


def _check(root: Path, kind: str, item: dict[str, Any], uncached: set[str]) -> Check:
    path, recorded = item["path"], item.get("md5")
    full = root / path
    if not full.exists():
        status = "not-stored" if path in uncached else "missing"
        return Check(kind, path, recorded, None, status)
    actual = dvc_md5(full)
    if actual == recorded:
        return Check(kind, path, recorded, actual, "ok")
    detail = _explain_dir_change(root, path, recorded) if full.is_dir() else f"{path} changed"
    return Check(kind, path, recorded, actual, "changed", detail)


def _lookup(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<absent>"
        tree = tree[part]
    return tree


def _stale_params(root: Path, recorded: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    stale = {}
    for file, values in recorded.items():
        try:
            current = load_yaml((root / file).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            current = {}
        for key, value in values.items():
            now = _lookup(current, key)
            if now != value:
                stale[key] = {"recorded": value, "now": now}
    return stale


def _uncached_outs(root: Path) -> set[str]:
    """Outputs dvc.yaml declares `cache: false` (checkpoints, reports): asked of DVC itself."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {str(o.def_path) for s in repo.index.stages for o in s.outs if not o.use_cache}


def _mlflow_runs(tracking_uri: str | None, outs: list[Check]) -> list[dict[str, str]] | None:
    """Runs whose `dvc.out.<path>` tag equals a recorded output hash (None: no store)."""
    if not tracking_uri:
        return None
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[10:]).exists():
        return None
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs: dict[str, dict[str, str]] = {}
        for check in outs:
            if not check.recorded or not experiments:
                continue
            for run in producer_runs(client, experiments, check.path, check.recorded):
                runs[run.info.run_id] = {
                    "run_id": run.info.run_id,
                    "status": run.info.status,
                    "stage": run.data.tags.get(TAG_STAGE, ""),
                    "group": run.data.tags.get(TAG_GROUP, ""),
                }
        return sorted(runs.values(), key=lambda r: r["run_id"])
    except Exception as exc:  # the audit of files must not depend on the tracker
        return [{"run_id": "", "status": f"store unreadable: {exc}".splitlines()[0]}]


def _packages(target: Path) -> dict[str, dict[str, str | None]]:

    lineage = target / "lineage.json" if target.is_dir() else None
    recorded = {}
    if lineage and lineage.exists():
        recorded = json.loads(lineage.read_text(encoding="utf-8")).get("packages", {})
    result = {}
    for name, rec in sorted(recorded.items()):
        try:
            now = version(name)
        except PackageNotFoundError:
            now = None
        result[name] = {"recorded": rec, "now": now}
    return result


def _recorded_git(target: Path) -> dict[str, Any]:
    lineage = target / "lineage.json"
    if target.is_dir() and lineage.exists():
        return json.loads(lineage.read_text(encoding="utf-8")).get("git", {})
    return {}


def committed_lock(root: Path) -> tuple[str | None, dict[str, Any]]:
    """(HEAD's short revision, the `stages` of the dvc.lock committed there); (None, {}) outside git."""
    import subprocess

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None

    text = git("show", "HEAD:./dvc.lock")
    rev = git("rev-parse", "--short", "HEAD")
    if text is None or rev is None:
        return None, {}
    return rev.strip(), (load_yaml(text) or {}).get("stages", {})


def not_committed(lock: dict[str, Any], committed: dict[str, Any], stages: list[str]) -> list[dict[str, str]]:
    """Outputs of `stages` whose md5 in the workspace dvc.lock is not the one the committed lock records:
    this machine rebuilt them with other bytes (timing files under reports/perf/ aside)."""
    was = {o["path"]: o.get("md5") for entry in committed.values() for o in entry.get("outs", [])}
    return [
        {"stage": name, "path": o["path"], "committed": was[o["path"]], "here": o.get("md5")}
        for name in stages
        for o in lock[name].get("outs", [])
        if o["path"] in was and was[o["path"]] != o.get("md5") and not o["path"].startswith("reports/perf/")
    ]


def audit(target: str, root: str | Path = ".", tracking_uri: str | None = None) -> dict[str, Any]:
    """Build the audit report of `target` (a path relative to the project root)."""
    root = Path(root)
    lock = read_lock(root)
    if not lock:
        raise LmpipeError(f"{root / 'dvc.lock'}: not found or empty: the pipeline never ran here")
    target = Path(target).as_posix().rstrip("/")
    uncached = _uncached_outs(root)
    stages = []
    for name in lineage_chain(lock, target):
        entry = lock[name]
        report = StageReport(name, entry.get("cmd", ""), entry.get("params", {}))
        report.checks = [_check(root, "dep", d, uncached) for d in entry.get("deps", [])]
        report.checks += [_check(root, "out", o, uncached) for o in entry.get("outs", [])]
        report.stale_params = _stale_params(root, report.params)
        runs = _mlflow_runs(tracking_uri, [c for c in report.checks if c.kind == "out"])
        report.mlflow_runs = runs if runs is not None else []
        stages.append(report)

    problems = []
    for stage in stages:
        for c in stage.checks:
            if c.status == "changed":
                why = "stale: input changed since the stage ran" if c.kind == "dep" else "output modified"
                problems.append(f"{stage.name}: {c.detail} ({why}; recorded {c.recorded}, now {c.actual})")
            elif c.status == "missing":
                problems.append(f"{stage.name}: {c.path} is missing (recorded {c.recorded})")
        for key, vals in stage.stale_params.items():
            problems.append(f"{stage.name}: stale: param {key} is {vals['now']!r} now, ran with {vals['recorded']!r}")
    target_path = root / target
    head, committed = committed_lock(root)
    return {
        "target": target,
        "ok": not problems,
        "problems": problems,
        # not a failure: the workspace lock proves these files; they are not the commit's bytes, though
        "not_committed": {"rev": head, "outputs": not_committed(lock, committed, [s.name for s in stages])},
        "git": {"recorded": _recorded_git(target_path), "now": code_state(root)},
        "packages": _packages(target_path),
        "tracking_uri_used": bool(tracking_uri),
        "stages": [
            {
                "name": s.name,
                "cmd": s.cmd,
                "params": s.params,
                "stale_params": s.stale_params,
                "files": [c.__dict__ for c in s.checks],
                "mlflow_runs": s.mlflow_runs,
            }
            for s in stages
        ],
    }


def audit_target(target: str, project: str | Path | None = None, tracking_uri: str | None = None) -> dict[str, Any]:
    """Audit any model path: inside the project (absolute or relative, from any folder in it), a copy
    outside it (checked against the project's dvc.lock and cache), or a registered `models:/...`."""
    root = Path(project) if project is not None else project_root()
    if not (root / "dvc.lock").is_file():
        raise LmpipeError(f"{root}: no dvc.lock here (pass --project PATH, the project the model came from)")
    if copies.is_registered(target):
        if not tracking_uri:
            raise LmpipeError(f"{target}: a registered model needs the MLflow store (drop --no-mlflow)")
        return _with_copy(copies.audit_registered(target, root, tracking_uri), root, tracking_uri)
    inside = copies.resolve_inside(target, root)
    if inside is not None:
        return audit(inside, root, tracking_uri)
    return _with_copy(copies.audit_copy(Path(target).expanduser().resolve(), root), root, tracking_uri)


def _with_copy(copy: copies.CopyReport, root: Path, tracking_uri: str | None) -> dict[str, Any]:
    """The copy's report, joined with the audit of the output it matches (when it matches a current one)."""
    if copy.match is not None and copy.match.current:
        report = audit(copy.match.out, root, tracking_uri)
    else:
        report = {
            "target": copy.source,
            "ok": True,
            "problems": [],
            "git": {"recorded": {}, "now": code_state(root)},
            "packages": {},
            "tracking_uri_used": bool(tracking_uri),
            "stages": [],
        }
    report["target"] = copy.source
    report["copy"] = copies.copy_summary(copy)
    report["problems"] = copy.problems + report["problems"]
    report["ok"] = not report["problems"]
    return report


def format_report(report: dict[str, Any]) -> str:
    """The human-readable audit, one block per stage, raw data first."""
    lines = [f"audit of {report['target']}"]
    copy = report.get("copy")
    if copy is not None:
        match = copy["match"]
        found = (
            "no output of this project"
            if match is None
            else (
                f"{match['out']}{'/' + match['part'] if match['part'] else ''} {match['md5']} "
                f"({'as dvc.lock records it now' if match['recorded_in_lock'] else 'an older version'})"
            )
        )
        lines.append(f"a copy of {copy['files']} files: {found}")
        lines.extend(f"  {note}" for note in copy["notes"])
    rec, now = report["git"]["recorded"], report["git"]["now"]
    if rec:
        lines.append(f"code at export: {rec.get('rev')} (dirty: {rec.get('dirty')})")
    lines.append(f"code now:       {now.get('rev')} (dirty: {now.get('dirty')})")
    for stage in report["stages"]:
        lines.append("")
        lines.append(f"stage {stage['name']}: {stage['cmd']}")
        for file, values in stage["params"].items():
            for key, value in values.items():
                shown = json.dumps(value, sort_keys=True)
                lines.append(f"  param {key} = {shown if len(shown) < 100 else shown[:97] + '...'}")
        for f in stage["files"]:
            mark = {"ok": "ok", "changed": "CHANGED", "missing": "MISSING", "not-stored": "not stored"}[f["status"]]
            lines.append(f"  {f['kind']:3} {f['path']:<45} {f['recorded'] or '-':<40} {mark}")
        for run in stage["mlflow_runs"]:
            lines.append(f"  mlflow run {run['run_id']} {run['status']} ({run.get('stage', '')})")
    if report["packages"]:
        lines.append("")
        lines.append("packages (recorded at export -> now):")
        for name, v in report["packages"].items():
            flag = "" if v["recorded"] == v["now"] else "  DIFFERENT"
            lines.append(f"  {name} {v['recorded']} -> {v['now']}{flag}")
    lines.append("")
    differ = report.get("not_committed", {}).get("outputs", [])
    if differ:
        rev = report["not_committed"]["rev"]
        lines.append(
            f"note: {len(differ)} output(s) are not the bytes the dvc.lock committed at {rev} records "
            "(this machine rebuilt them; `lmpipe audit --rebuild` says whether the metrics agree):"
        )
        lines.extend(f"  {d['path']:<45} committed {d['committed']}, here {d['here']}" for d in differ)
        lines.append("")
    if report["ok"]:
        n = sum(len(s["files"]) for s in report["stages"])
        lines.append(f"OK: {len(report['stages'])} stages, {n} recorded paths match the disk")
    else:
        lines.append(f"FAILED: {len(report['problems'])} problem(s)")
        lines.extend(f"  - {p}" for p in report["problems"])
    return "\n".join(lines)
