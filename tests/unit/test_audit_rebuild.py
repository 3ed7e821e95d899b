"""lmpipe.audit.rebuild without DVC: lock against lock, metrics against CIs, verdicts, exit codes, the copy."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from lmpipe.audit import rebuild as rb
from lmpipe.cli.main import main
from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import code_state, dvc_md5, git_state

A, B, C = "a" * 32, "b" * 32, "c" * 32


def lock(**stages: dict[str, str]) -> dict:
    """A dvc.lock `stages` mapping: {stage: {out path: md5}}."""
    out = {}
    for name, outs in stages.items():
        out[name] = {"cmd": f"python -m stages.{name}", "outs": [{"path": p, "md5": m} for p, m in outs.items()]}
    return out


COMMITTED = lock(
    train={"models/m": A + ".dir", "reports/perf/train.json": B},
    evaluate={"reports/evaluate/metrics.json": C},
)


def statuses(checks) -> dict[str, str]:
    return {c.path: c.status for c in checks}


# --------------------------------------------------------------------------- outputs
def test_the_same_md5s_are_identical_and_timing_files_never_count():
    rebuilt = {"models/m": A + ".dir", "reports/perf/train.json": "f" * 32, "reports/evaluate/metrics.json": C}
    checks = rb.compare_outputs(COMMITTED, rebuilt, ["train", "evaluate"])
    assert statuses(checks) == {
        "models/m": "identical",
        "reports/perf/train.json": "timing",
        "reports/evaluate/metrics.json": "identical",
    }
    assert rb.verdict(checks, []) == "identical"


def test_a_changed_file_is_different_and_names_both_hashes():
    rebuilt = {"models/m": B + ".dir", "reports/perf/train.json": B}
    checks = rb.compare_outputs(COMMITTED, rebuilt, ["train"])
    model = next(c for c in checks if c.path == "models/m")
    assert (model.stage, model.committed, model.rebuilt, model.status) == ("train", A + ".dir", B + ".dir", "different")


def test_an_output_the_rebuild_did_not_write_is_missing():
    rebuilt = {"models/m": None, "reports/perf/train.json": B}
    checks = rb.compare_outputs(COMMITTED, rebuilt, ["train", "evaluate"])
    assert statuses(checks) == {
        "models/m": "missing",
        "reports/perf/train.json": "timing",
        "reports/evaluate/metrics.json": "missing",
    }


def test_only_the_stages_that_ran_are_compared():
    checks = rb.compare_outputs(COMMITTED, {"models/m": A + ".dir"}, ["train"])
    assert "reports/evaluate/metrics.json" not in statuses(checks)


def test_changed_code_or_params_are_named_but_produced_inputs_are_not():
    committed = {
        "train": {
            "deps": [{"path": "lmpipe/core", "md5": A + ".dir"}, {"path": "data/x", "md5": A}],
            "params": {"params.yaml": {"base": {"seed": 1}}},
            "outs": [{"path": "models/m", "md5": A}],
        },
        "prep": {"outs": [{"path": "data/x", "md5": A}]},
    }
    rebuilt = {
        "train": {
            "deps": [{"path": "lmpipe/core", "md5": B + ".dir"}, {"path": "data/x", "md5": B}],
            "params": {"params.yaml": {"base": {"seed": 2}}},
            "outs": [{"path": "models/m", "md5": A}],
        }
    }
    assert rb.changed_inputs(committed, rebuilt, ["prep", "train"]) == [
        "train: lmpipe/core differs from the record",
        "train: param base differs from the record",
    ]
    assert rb.changed_inputs(committed, committed, ["prep", "train"]) == []


# --------------------------------------------------------------------------- metrics against CIs
METRICS = {
    "n_test": 120,
    "scratch": {
        "accuracy": 0.80,
        "accuracy_ci_low": 0.70,
        "accuracy_ci_high": 0.90,
        "f1": 0.60,
        "f1_ci_low": 0.50,
        "f1_ci_high": 0.70,
        "mcnemar_p": 0.3,  # no CI: skipped
        "vs_random_accuracy_diff": 0.05,
        "vs_random_ci_low": -0.05,
        "vs_random_ci_high": 0.15,
        "roc_auc": 0.5,
        "roc_auc_ci_low": float("nan"),  # undefined CI: skipped
        "roc_auc_ci_high": float("nan"),
    },
    "ensemble": {
        "vs_best_member": "baseline",  # a name, not a metric, though vs_best_member_ci_* exist
        "vs_best_member_accuracy_diff": 0.01,
        "vs_best_member_ci_low": -0.02,
        "vs_best_member_ci_high": 0.05,
    },
    "pretrained": {"test_mlm_perplexity": 200.0},  # no CI at all
}


def rebuilt_metrics(**changes: float) -> dict:
    out = json.loads(json.dumps(METRICS))
    out["scratch"].update(changes)
    return out


def test_every_metric_with_a_ci_is_judged_and_the_others_are_skipped():
    checks = rb.compare_metrics(METRICS, rebuilt_metrics())
    assert {c.name: c.status for c in checks} == {
        "scratch.accuracy": "inside",
        "scratch.f1": "inside",
        "scratch.vs_random_accuracy_diff": "inside",
        "ensemble.vs_best_member_accuracy_diff": "inside",
    }
    diff = next(c for c in checks if c.name == "scratch.vs_random_accuracy_diff")
    assert (diff.ci_low, diff.ci_high) == (-0.05, 0.15)


@pytest.mark.parametrize(
    ("value", "status"),
    [(0.75, "inside"), (0.70, "inside"), (0.90, "inside"), (0.6999, "outside"), (0.9001, "outside")],
    ids=["inside", "on-the-low-bound", "on-the-high-bound", "just-below", "just-above"],
)
def test_a_value_on_a_bound_is_inside_and_past_it_outside(value, status):
    checks = rb.compare_metrics(METRICS, rebuilt_metrics(accuracy=value))
    accuracy = next(c for c in checks if c.name == "scratch.accuracy")
    assert (accuracy.committed, accuracy.rebuilt, accuracy.ci_low, accuracy.ci_high) == (0.80, value, 0.70, 0.90)
    assert accuracy.status == status


def test_a_metric_the_rebuild_lacks_is_missing_and_counts_against():
    rebuilt = rebuilt_metrics()
    del rebuilt["scratch"]["f1"]
    rebuilt["scratch"]["accuracy"] = float("nan")
    checks = rb.compare_metrics(METRICS, rebuilt)
    assert {c.name: c.status for c in checks}["scratch.f1"] == "missing"
    assert {c.name: c.status for c in checks}["scratch.accuracy"] == "missing"
    different = [rb.OutputCheck("train", "models/m", A, B, "different")]
    assert rb.verdict(different, checks) == "beyond-ci"


def test_perplexity_is_shown_but_never_judged():
    ppl = rb.compare_perplexity({"ppl": 200.0}, {"ppl": 900.0})
    assert [(p.name, p.committed, p.rebuilt, p.status) for p in ppl] == [("pretrain.ppl", 200.0, 900.0, "no-ci")]
    different = [rb.OutputCheck("train", "models/m", A, B, "different")]
    assert rb.verdict(different, ppl) == "unjudged"
    assert rb.compare_perplexity({}, {}) == []


# --------------------------------------------------------------------------- verdicts and exit codes
def test_verdicts_and_their_exit_codes():
    same = [rb.OutputCheck("s", "m", A, A, "identical"), rb.OutputCheck("s", "reports/perf/x.json", A, B, "timing")]
    differ = [*same, rb.OutputCheck("s", "n", A, B, "different")]
    inside = rb.compare_metrics(METRICS, rebuilt_metrics())
    outside = rb.compare_metrics(METRICS, rebuilt_metrics(f1=0.99))
    cases = {
        "identical": rb.verdict(same, outside),  # equal bytes need no metric
        "within-ci": rb.verdict(differ, inside),
        "beyond-ci": rb.verdict(differ, outside),
        "unjudged": rb.verdict(differ, []),
    }
    assert {name: got for name, got in cases.items()} == {name: name for name in cases}
    assert {v: rb.exit_code(v) for v in rb.EXIT_CODES} == {
        "identical": 0,
        "failed": 1,
        "within-ci": 3,
        "beyond-ci": 4,
        "unjudged": 5,
    }
    assert 2 not in rb.EXIT_CODES.values()  # the CLI's user-error code stays unambiguous


# --------------------------------------------------------------------------- judging two project folders
def write_project(root, model: str, metrics: dict | None, stages=("train", "evaluate")):
    """A project folder after a run: models/m, reports/evaluate/metrics.json, a dvc.lock of their md5s."""
    files = {"models/m/w.bin": model, rb.EVAL_METRICS: json.dumps(metrics) if metrics is not None else None}
    for rel, text in files.items():
        if text is not None:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
    outs = {"train": {"models/m": dvc_md5(root / "models/m")}}
    if metrics is not None:
        outs["evaluate"] = {rb.EVAL_METRICS: dvc_md5(root / rb.EVAL_METRICS)}
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": lock(**outs)}))
    return root


def judged(report: dict, tmp_path) -> str:
    """The text report of a judge() result, with the fields rebuild() adds."""
    report["machine"] = rb.machine(tmp_path / "params.yaml")
    report.update(target="models/m", targets=["train"], seconds=1.0, workdir=str(tmp_path), kept=True, notes=[])
    return rb.format_rebuild(report)


def test_judge_hashes_the_rebuilt_files_and_explains_a_within_ci_rebuild(tmp_path):
    committed = write_project(tmp_path / "committed", "weights", METRICS)
    rebuilt = write_project(tmp_path / "rebuilt", "other weights", rebuilt_metrics(accuracy=0.71))
    (rebuilt / "dvc.lock").write_text((committed / "dvc.lock").read_text())  # a lock proves nothing: the files do
    report = rb.judge(committed, rebuilt, ["train", "evaluate"])
    assert (report["verdict"], report["exit_code"]) == ("within-ci", 3)
    assert [(o["path"], o["status"]) for o in report["outputs"]] == [
        ("models/m", "different"),
        (rb.EVAL_METRICS, "different"),
    ]
    text = judged(report, tmp_path)
    assert "models/m" in text and "DIFFERENT" in text and "verdict: within-ci (exit 3)" in text
    assert "scratch.accuracy                         0.7100  committed 0.8000  CI [0.7000, 0.9000]" in text


def test_the_same_files_are_identical_without_looking_at_metrics(tmp_path):
    committed = write_project(tmp_path / "committed", "weights", METRICS)
    rebuilt = write_project(tmp_path / "rebuilt", "weights", METRICS)
    report = rb.judge(committed, rebuilt, ["train", "evaluate"])
    assert (report["verdict"], report["exit_code"], report["metrics"]) == ("identical", 0, [])


def test_a_target_short_of_evaluate_is_unjudged_not_beyond(tmp_path):
    committed = write_project(tmp_path / "committed", "weights", METRICS)
    rebuilt = write_project(tmp_path / "rebuilt", "other weights", None)
    assert rb.judge(committed, rebuilt, ["train"])["verdict"] == "unjudged"


def test_the_beyond_ci_line_names_the_metric_with_both_values_and_the_ci(tmp_path):
    committed = write_project(tmp_path / "committed", "weights", METRICS)
    rebuilt = write_project(tmp_path / "rebuilt", "weights", rebuilt_metrics(f1=0.99))
    report = rb.judge(committed, rebuilt, ["train", "evaluate"])
    assert (report["verdict"], report["exit_code"]) == ("beyond-ci", 4)
    assert "scratch.f1                               0.9900  committed 0.6000  CI [0.5000, 0.7000]  OUTSIDE" in (
        judged(report, tmp_path)
    )


def test_committed_metrics_that_are_not_the_recorded_ones_are_refused(tmp_path):
    root = write_project(tmp_path / "p", "weights", METRICS)
    rb.judge_files(root, rb.read_lock(root), ["train", "evaluate"])  # as recorded: fine
    (root / rb.EVAL_METRICS).write_text(json.dumps(rebuilt_metrics(accuracy=0.1)))
    with pytest.raises(LmpipeError, match="not the file dvc.lock records.*git checkout -- reports/evaluate"):
        rb.judge_files(root, rb.read_lock(root), ["train", "evaluate"])


def test_a_target_no_stage_writes_is_a_user_error():
    with pytest.raises(LmpipeError, match="models/nothing: no stage in dvc.lock produced it"):
        rb.stages_for(COMMITTED, "models/nothing")
    assert rb.stages_for(COMMITTED, "models/m") == (["train"], ["train"])


# --------------------------------------------------------------------------- the copy
def git(*args, cwd):
    quiet = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    return subprocess.run(["git", *quiet, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def make_source_project(src):
    files = {
        "stages/train.py": "code",
        "params.yaml": "base: {numerics: fast}\n",
        ".gitignore": "/mlflow.db\n/userdata/reviews.csv\n/models/m\n",
        "userdata/reviews.csv.dvc": "outs:\n- md5: x\n  path: reviews.csv\n",
        "userdata/reviews.csv": "text,label\n",  # dvc add-ed: ignored by git, copied all the same
        "models/m/w.bin": "weights",  # an output DVC caches (git-ignored)
        "reports/train.json": "{}",  # an output kept in git
        "reports/notes.md": "tracked, no stage writes it",
        "dvc.lock": yaml.safe_dump({"stages": lock(train={"models/m": A + ".dir", "reports/train.json": B})}),
        "mlflow.db": "store",
        "new.txt": "new, not ignored",
    }
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    git("init", "-q", cwd=src)
    git("add", "stages", "params.yaml", ".gitignore", "userdata/reviews.csv.dvc", "reports", "dvc.lock", cwd=src)
    git("commit", "-qm", "x", cwd=src)
    return src


def test_the_copy_holds_the_sources_and_the_record_at_the_same_commit_but_no_output(tmp_path):
    src = make_source_project(tmp_path / "src")
    dest = tmp_path / "copy"
    dest.mkdir()
    assert rb.copy_sources(src, dest, rb.read_lock(src)) == (8, None)
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file() and ".git/" not in str(p))
    assert copied == [
        ".gitignore",
        "dvc.lock",
        "new.txt",
        "params.yaml",
        "reports/notes.md",
        "stages/train.py",
        "userdata/reviews.csv",
        "userdata/reviews.csv.dvc",
    ]
    # what a stage records about the code it ran (lineage.json, MLflow tags) is the same in the copy
    assert git_state(dest) == git_state(src) == {"rev": git("rev-parse", "HEAD", cwd=src).strip(), "dirty": False}
    assert code_state(dest) == code_state(src)  # the whole history came along: lineage's code revision too
    assert rb.machine(dest / "params.yaml")["numerics"] == "fast"
    assert rb.machine(tmp_path / "absent.yaml")["numerics"] is None


def test_a_project_without_a_commit_gets_one_of_its_own(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "params.yaml").write_text("base: {}\n")
    git("init", "-q", cwd=src)
    dest = tmp_path / "copy"
    dest.mkdir()
    files, note = rb.copy_sources(src, dest, {})
    assert files == 1 and "could not take" in note and "lineage.json) will differ" in note
    assert git_state(dest)["rev"] and git_state(dest)["dirty"] is False


def test_a_project_outside_git_is_a_user_error(tmp_path):
    with pytest.raises(LmpipeError, match="not a git repository"):
        rb.copy_sources(tmp_path, tmp_path / "copy", {})


def test_a_workdir_with_something_in_it_is_refused(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old/file").write_text("x")
    with pytest.raises(LmpipeError, match="--workdir must be a new or empty folder"):
        rb._workdir(tmp_path / "old")


def test_the_rebuild_environment_drops_the_tracking_uri_and_keeps_the_rest(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-server")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    env = rb.rebuild_env("rebuild-x")
    assert "MLFLOW_TRACKING_URI" not in env
    assert env["ATEN_CPU_CAPABILITY"] == "default" and env["LMPIPE_RUN_GROUP"] == "rebuild-x"
    assert rb.machine(Path("absent"))["env"]["ATEN_CPU_CAPABILITY"] == "default"


# --------------------------------------------------------------------------- the command line
def test_keep_without_rebuild_and_an_unknown_target_are_user_errors(tmp_path, capsys):
    write_project(tmp_path, "weights", METRICS)
    (tmp_path / ".dvc").mkdir()
    assert main(["audit", "--keep", "--project", str(tmp_path)]) == 2
    assert "--keep and --workdir go with --rebuild" in capsys.readouterr().err
    assert main(["audit", "--rebuild", "models/nothing", "--project", str(tmp_path)]) == 2
    assert "models/nothing: no stage in dvc.lock produced it" in capsys.readouterr().err
    assert main(["audit", "--rebuild", "models:/lmpipe-classifier/1", "--project", str(tmp_path)]) == 2
    assert "--rebuild reruns an output of the project" in capsys.readouterr().err
