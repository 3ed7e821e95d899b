"""Atomic writes: an output is complete or absent, never half-written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lmpipe.core.io import atomic_dir, atomic_file, load_yaml, read_json, write_json


def test_atomic_file_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_replaces_old_output_whole(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_atomic_dir_keeps_old_output_when_the_new_one_fails(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("half")
            raise ValueError("bad input")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert (target / "old.bin").read_text() == "old"


def test_write_json_is_byte_stable(tmp_path):
    write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, "é"]})
    write_json(tmp_path / "b.json", {"a": [1.5, "é"], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert read_json(tmp_path / "a.json") == {"a": [1.5, "é"], "b": 1}


def test_load_yaml_reads_the_floats_dvc_writes_as_floats():
    # DVC (ruamel, YAML 1.2) writes `5e-05` to dvc.lock; PyYAML would read it as a string,
    # and the audit would then call every stage stale.
    assert load_yaml("lr: 5e-05\nother: 1.0e-3\nflag: true\n") == {"lr": 5e-05, "other": 1e-3, "flag": True}


# A stage that writes 8 MiB into `target` through the atomic writers; argv[2] = file size limit in bytes
# (0 = none). RLIMIT_FSIZE makes the kernel refuse the write past the limit (EFBIG), as a full disk
# (ENOSPC) would; the stage entry ignores SIGXFSZ so the write raises instead of killing the process.
DISK_FILLER = textwrap.dedent("""
    import resource, sys
    from lmpipe.core import io
    from lmpipe.core.stage import run
    target, limit, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if limit:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    def main():
        if how == "text":
            io.write_text(target, "x" * (8 << 20))
        elif how == "dir":
            with io.atomic_dir(target) as tmp:
                (tmp / "weights.bin").write_bytes(b"w" * (8 << 20))
        else:
            with io.atomic_file(target) as tmp, open(tmp, "wb") as handle:
                for _ in range(8):
                    handle.write(b"x" * (1 << 20))

    run(main)
""")


def _fill(project_root, target, limit, how):
    return subprocess.run(
        [sys.executable, "-c", DISK_FILLER, str(target), str(limit), how],
        cwd=project_root,
        env={**os.environ, "PYTHONPATH": str(project_root)},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("how", ["file", "text", "dir"])
def test_full_disk_fails_in_one_line_leaves_nothing_and_a_rerun_succeeds(project_root, tmp_path, how):
    target = tmp_path / "out" / "big.bin"
    full = _fill(project_root, target, 1 << 20, how)
    assert full.returncode == 2, full.stderr
    assert full.stderr.splitlines() == [full.stderr.strip()]  # one line, no traceback
    assert full.stderr.startswith(f"error: {target}: no space left on device")
    assert list((tmp_path / "out").iterdir()) == []  # no partial output, no temp sibling
    again = _fill(project_root, target, 0, how)
    assert again.returncode == 0, again.stderr
    written = target / "weights.bin" if how == "dir" else target
    assert written.stat().st_size == 8 << 20
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["big.bin"]
