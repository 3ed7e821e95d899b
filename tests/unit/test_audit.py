"""lmpipe.audit.audit: outputs whose bytes are not the committed lock's are named (a rebuild elsewhere)."""

from __future__ import annotations

import subprocess

import yaml

from lmpipe.audit.audit import committed_lock, format_report, not_committed


def lock(model_md5: str, perf_md5: str) -> dict:
    outs = [{"path": "models/pretrained", "md5": model_md5}, {"path": "reports/perf/pretrain.json", "md5": perf_md5}]
    return {"pretrain": {"cmd": "python -m stages.pretrain", "outs": outs}}


def test_outputs_rebuilt_with_other_bytes_are_named_and_timing_files_are_not():
    committed, here = lock("a" * 32 + ".dir", "p1"), lock("b" * 32 + ".dir", "p2")
    assert not_committed(here, committed, ["pretrain"]) == [
        {"stage": "pretrain", "path": "models/pretrained", "committed": "a" * 32 + ".dir", "here": "b" * 32 + ".dir"}
    ]
    assert not_committed(committed, committed, ["pretrain"]) == []
    assert not_committed(here, {}, ["pretrain"]) == []  # nothing committed: nothing to compare with


def test_the_committed_lock_is_read_from_git_head(tmp_path):
    def git(*args: str) -> None:
        subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args], cwd=tmp_path, check=True
        )

    assert committed_lock(tmp_path) == (None, {})  # not a repository
    git("init", "-q")
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock("c" * 32, "p")}))
    git("add", "dvc.lock")
    git("commit", "-qm", "lock")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # the workspace moved on; HEAD did not
    rev, stages = committed_lock(tmp_path)
    assert rev and stages["pretrain"]["outs"][0]["md5"] == "c" * 32


def test_the_report_notes_them_without_failing():
    report = {
        "target": "models/pretrained",
        "ok": True,
        "problems": [],
        "git": {"recorded": {}, "now": {"rev": "r", "dirty": False}},
        "packages": {},
        "stages": [],
        "not_committed": {"rev": "abc1234", "outputs": not_committed(lock("b", "p"), lock("a", "p"), ["pretrain"])},
    }
    text = format_report(report)
    assert "note: 1 output(s) are not the bytes the dvc.lock committed at abc1234 records" in text
    assert "models/pretrained" in text and "committed a, here b" in text and text.rstrip().endswith("match the disk")
