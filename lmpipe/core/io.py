"""Atomic writes: an output appears complete or not at all.

Every file or folder a stage produces goes through these helpers, so a crash, a kill or a
validation error never leaves something DVC could mistake for a result. A full disk, a quota or
a file size limit (ENOSPC, EDQUOT, EFBIG) becomes an LmpipeError naming the output (the stage
prints one line and exits 2) once the temporary sibling is removed; `lmpipe.core.stage.run`
maps such an error from any other write the same way (`disk_full`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmpipe.core.errors import LmpipeError

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def disk_full(exc: BaseException, path: str | os.PathLike | None = None) -> LmpipeError | None:
    """The user error for an OSError that says the disk (or quota, or file size limit) is full, else None."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    where = path if path is not None else (exc.filename or "an output")
    reason = f"{errno.errorcode[exc.errno]}: {os.strerror(exc.errno)}"
    return LmpipeError(
        f"{where}: no space left on device ({reason}); nothing was written: free space "
        "(or raise the quota or file size limit) and rerun"
    )


def _tmp_sibling(path: Path, is_dir: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it into place, on error delete it."""
    target = Path(path)
    tmp = _tmp_sibling(target, is_dir=False)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, target)
    except BaseException as exc:
        remove(tmp)
        _raise_disk_full(exc, target)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` whole.

    The old folder (if any) is swapped out and deleted only after the new one is complete.
    """
    target = Path(path)
    tmp = _tmp_sibling(target, is_dir=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if target.exists():
            old = _tmp_sibling(target, is_dir=True)
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            remove(old)
        else:
            os.replace(tmp, target)
    except BaseException as exc:
        remove(tmp)
        _raise_disk_full(exc, target)
        raise


_WRONG_KIND = {
    errno.EISDIR: "is a folder where a file is expected",
    errno.ENOTDIR: "a part of this path is a file where a folder is expected",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def user_error(exc: BaseException) -> LmpipeError | None:
    """The one-line user error for an OSError the user can act on (a full disk, a folder where a
    file should be, no permission), naming the path; None for anything else (a bug: keep its traceback)."""
    full = disk_full(exc)
    if full is not None or not isinstance(exc, OSError):
        return full
    if exc.errno in _WRONG_KIND and exc.filename is not None:
        return LmpipeError(f"{exc.filename}: {_WRONG_KIND[exc.errno]}")
    return None


def _raise_disk_full(exc: BaseException, target: Path) -> None:
    error = disk_full(exc, target)
    if error is not None:
        raise error from exc


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 text atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically, keys sorted and indented so the bytes are stable and diffable."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def load_yaml(text: str) -> Any:
    """Parse YAML 1.2 exactly as DVC does (ruamel): `lr: 5e-05` is a float, not a string.

    PyYAML (YAML 1.1) reads the floats DVC writes to dvc.lock as strings, so every YAML file
    the pipeline shares with DVC (params.yaml, dvc.lock) is read here.
    """
    from ruamel.yaml import YAML

    return YAML(typ="safe", pure=True).load(text)


def jsonl_record(line: str, where: str) -> dict[str, Any] | None:
    """One line of a JSON Lines file as its object; None for a blank line; errors name `where` (file line N)."""
    line = line.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise LmpipeError(f"{where}: expected one JSON object per line, got a {type(record).__name__}")
    return record


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
