"""lmpipe.audit.copies: a folder outside the project matched by its bytes to an output version."""

from __future__ import annotations

import json

import pytest

from lmpipe.audit import copies
from lmpipe.core.lineage import dir_listing, dvc_md5


def make_project(root, files):
    """A project whose dvc.lock records models/export (files) and whose DVC cache holds its listing."""
    export = root / "models/export"
    for rel, text in files.items():
        (export / rel).parent.mkdir(parents=True, exist_ok=True)
        (export / rel).write_text(text)
    md5 = dvc_md5(export)
    digest = md5.removesuffix(".dir")
    listing = root / ".dvc/cache/files/md5" / digest[:2] / (digest[2:] + ".dir")
    listing.parent.mkdir(parents=True)
    listing.write_text(json.dumps(dir_listing(export)))
    lock = {"schema": "2.0", "stages": {"export": {"cmd": "x", "outs": [{"path": "models/export", "md5": md5}]}}}
    (root / "dvc.lock").write_text(json.dumps(lock))
    return export, md5


FILES = {"hf/model.safetensors": "weights", "hf/config.json": "{}", "onnx/model.onnx": "graph"}


def test_a_whole_copy_and_a_part_of_an_output_are_found(tmp_path):
    export, md5 = make_project(tmp_path / "p", FILES)
    whole = copies.find_copy(tmp_path / "p", {e["relpath"]: e["md5"] for e in dir_listing(export)})
    assert (whole.out, whole.prefix, whole.md5, whole.current) == ("models/export", "", md5, True)
    part = copies.find_copy(tmp_path / "p", {e["relpath"]: e["md5"] for e in dir_listing(export / "hf")})
    assert (part.out, part.prefix) == ("models/export", "hf")


def test_an_edited_copy_matches_nothing_and_its_own_lineage_names_the_file(tmp_path):
    export, _ = make_project(tmp_path / "p", FILES)
    copy = tmp_path / "srv"
    (copy / "hf").mkdir(parents=True)
    (copy / "hf/model.safetensors").write_text("tampered")
    (copy / "hf/config.json").write_text("{}")
    lineage = {
        "files": {
            rel: {"md5": e}
            for rel, e in {
                "hf/model.safetensors": dvc_md5(export / "hf/model.safetensors"),
                "hf/config.json": dvc_md5(export / "hf/config.json"),
            }.items()
        }
    }
    (copy / "lineage.json").write_text(json.dumps(lineage))
    report = copies.audit_copy(copy, tmp_path / "p")
    assert report.match is None
    assert report.problems[0] == f"{copy / 'hf/model.safetensors'}: differs from the md5 in its lineage.json"
    assert "match no output version" in report.problems[-1]


def test_an_older_cached_version_is_named_as_such(tmp_path):
    root = tmp_path / "p"
    export, old = make_project(root, FILES)
    old_files = {e["relpath"]: e["md5"] for e in dir_listing(export)}
    (export / "onnx/model.onnx").write_text("new graph")
    lock = json.loads((root / "dvc.lock").read_text())
    lock["stages"]["export"]["outs"][0]["md5"] = dvc_md5(export)
    (root / "dvc.lock").write_text(json.dumps(lock))
    match = copies.find_copy(root, old_files)
    assert match.md5 == old and not match.current


@pytest.mark.parametrize("where", ["absolute", "relative", "sub-folder"])
def test_any_path_form_inside_the_project_resolves_to_the_output(tmp_path, monkeypatch, where):
    root = tmp_path / "p"
    make_project(root, FILES)
    target = {"absolute": str(root / "models/export"), "relative": "models/export", "sub-folder": "export"}[where]
    monkeypatch.chdir(root / "models" if where == "sub-folder" else root)
    assert copies.resolve_inside(target, root) == "models/export"
    assert copies.resolve_inside(str(tmp_path / "elsewhere"), root) is None
