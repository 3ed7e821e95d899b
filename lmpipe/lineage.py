"""Content hashes exactly as DVC computes them, the git state, and `dvc.lock` reading.

Hashes use DVC 3's scheme (md5 of a file; for a folder, md5 of the JSON listing of its files'
md5s, suffixed `.dir`), so a hash logged to MLflow or written in a model card can be compared
with `dvc.lock` and with the files on disk without running DVC.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from lmpipe.io import load_yaml

CHUNK = 1 << 20


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


def git_state(root: str | os.PathLike) -> dict[str, Any]:
    """{"rev": commit sha or None, "dirty": bool or None} of the repository at `root`."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    rev = git("rev-parse", "HEAD")
    # DVC itself rewrites dvc.lock and the .gitignore files of outputs during `dvc repro`:
    # those edits say nothing about the code that ran.
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 ":(exclude)dvc.lock", ":(exclude,glob)**/.gitignore")
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
