"""The practitioner's toolbox side by side: one `dvc exp run` per fine-tuning method.

    python -m studies.toolbox                        # = make toolbox (~25 min on 2 cores)
    python -m studies.toolbox --backbone minilm --methods full,lora,prefix

Each method is a set of `-S` overrides of `params.yaml` on one backbone (default `scratch`, the
one export ships), run as a DVC experiment up to `evaluate`:

    dvc exp run --temp evaluate -n toolbox-<method> -S finetune.backbones.scratch.mode=adapter

so it is reproducible like any other experiment (`dvc exp show`, `dvc exp apply toolbox-adapter`)
and its stage runs land in MLflow under the group `toolbox-<method>` with every param
(`lmpipe compare` lists them). From each experiment's commit the table reads the backbone's
test row of reports/evaluate/metrics.json (accuracy with its bootstrap 95% CI), its
reports/finetune/<b>/metrics.json (trainable parameters and share, steps) and
reports/perf/finetune/<b>.json (training seconds); peak memory is the finetune run's
`peak_rss_mb` in MLflow. A method the backbone cannot take (prefix-tuning on ModernBERT) stops
before work; its row records the one-line error.

Each experiment runs in a temporary copy (`--temp`), so the workspace keeps the shipped
params and outputs; only the changed stages rerun there (finetune@<b> and evaluate, ~2 min a
method on 2 cores). Never pass `-f` to `dvc exp run` for this: it means `--force`, every stage.

Writes reports/toolbox/toolbox.{md,json} (committed: the table the README quotes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "reports/toolbox"
DEFAULT_COMMAND = "make toolbox"
EXPERIMENT_PREFIX = "toolbox-"


def methods(b: str) -> dict[str, list[str]]:
    """Method -> `-S` overrides on backbone `b` (the rest of params.yaml as shipped)."""
    mode = f"finetune.backbones.{b}.mode"
    return {
        "full": [],
        "frozen": [f"{mode}=frozen"],
        "lora": [f"{mode}=lora"],
        "adalora": [f"{mode}=adalora"],
        "adapter": [f"{mode}=adapter"],
        "prefix": [f"{mode}=prefix"],
        "fgm": ["finetune.adversarial.method=fgm"],
        "augment": ["finetune.augmentation.copies=1"],
    }


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return subprocess.run(["dvc", *args], cwd=ROOT, env=env, text=True, capture_output=True, check=check)


def run_experiment(experiment: str, overrides: list[str]) -> tuple[bool, str]:
    """`dvc exp run --temp evaluate -n <experiment> -S ...`; (ok, the error line when it failed)."""
    dvc("exp", "remove", experiment, check=False)  # a rerun replaces it (`-f` would force every stage)
    args = ["exp", "run", "--temp", "evaluate", "-n", experiment]
    for override in overrides:
        args += ["-S", override]
    done = dvc(*args, check=False)
    if done.returncode == 0:
        return True, ""
    marks = ("params.yaml", "finetune.", "Error")  # the stage's one-line error, or DVC's
    lines = [ln for ln in (done.stderr + done.stdout).splitlines() if any(k in ln for k in marks)]
    return False, (lines[-1] if lines else (done.stderr.strip().splitlines() or ["failed"])[-1]).strip()


def exp_commit(experiment: str) -> str | None:
    """The commit of DVC experiment `experiment` (kept under refs/exps), None when there is none."""
    refs = subprocess.run(
        ["git", "for-each-ref", "refs/exps", "--format=%(refname) %(objectname)"],
        cwd=ROOT,
        text=True,
        capture_output=True,
        check=True,
    ).stdout.split("\n")
    for line in refs:
        if line.split(" ")[0].endswith("/" + experiment):
            return line.split(" ")[1]
    return None


def show_at(commit: str, path: str) -> str:
    """The text of `path` in `commit` (an experiment's commit holds its git-tracked reports)."""
    return subprocess.run(
        ["git", "show", f"{commit}:{path}"], cwd=ROOT, text=True, capture_output=True, check=True
    ).stdout


def read_at(commit: str, path: str) -> dict[str, Any]:
    return json.loads(show_at(commit, path))


def peak_rss(group: str, stage: str) -> float | None:
    """`peak_rss_mb` of the finished `stage` run of MLflow group `group` (None when not found)."""
    import mlflow

    from lmpipe.core.lineage import TAG_GROUP, TAG_STAGE
    from lmpipe.core.params import load_params
    from lmpipe.core.project import default_tracking_uri

    client = mlflow.MlflowClient(default_tracking_uri(ROOT))
    experiment = client.get_experiment_by_name(load_params(ROOT / "params.yaml").base.experiment)
    if experiment is None:
        return None
    query = f"tags.`{TAG_GROUP}` = '{group}' and tags.`{TAG_STAGE}` = '{stage}' and attributes.status = 'FINISHED'"
    runs = client.search_runs([experiment.experiment_id], query, order_by=["attributes.end_time DESC"], max_results=1)
    return runs[0].data.metrics.get("peak_rss_mb") if runs else None


def row(name: str, overrides: list[str], backbone: str) -> dict[str, Any]:
    commit = exp_commit(EXPERIMENT_PREFIX + name)
    if commit is None:
        raise SystemExit(f"toolbox: experiment {EXPERIMENT_PREFIX + name} not found under refs/exps")
    test = read_at(commit, "reports/evaluate/metrics.json")[backbone]
    fit = read_at(commit, f"reports/finetune/{backbone}/metrics.json")
    perf = read_at(commit, f"reports/perf/finetune/{backbone}.json")
    return {
        "method": name,
        "overrides": overrides,
        "status": "ok",
        "accuracy": test["accuracy"],
        "accuracy_ci": [test["accuracy_ci_low"], test["accuracy_ci_high"]],
        "f1": test["f1"],
        "val_accuracy": fit.get("val_accuracy"),
        "trainable_params": fit.get("trainable_params"),
        "trainable_share": fit.get("trainable_share"),
        "train_examples": fit.get("train_examples"),
        "steps": fit.get("steps"),
        "seconds_per_step": perf["train_seconds"] / fit["steps"] if fit.get("steps") else None,
        "peak_rss_mb": peak_rss(EXPERIMENT_PREFIX + name, f"finetune@{backbone}"),
        "commit": commit,
    }


def _cell(value: Any, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def markdown(rows: list[dict[str, Any]], backbone: str, command: str) -> str:
    lines = [
        f"# Fine-tuning methods side by side ({backbone})\n",
        f"`{command}`: one `dvc exp run --temp evaluate -S ...` per method on the default data and budget; "
        "test accuracy on the 2,000 test reviews with its bootstrap 95% CI; seconds per step and peak RSS "
        "of the finetune stage on this machine.\n",
        "| method | overrides | test accuracy [95% CI] | F1 | trainable params | share | s/step | peak RSS MB |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        flags = " ".join(f"`{o}`" for o in r["overrides"]) or "(the shipped recipe)"
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {flags} | refused: {r['status']} | | | | | |")
            continue
        lo, hi = r["accuracy_ci"]
        lines.append(
            f"| {r['method']} | {flags} | {r['accuracy']:.4f} [{lo:.4f}, {hi:.4f}] | {r['f1']:.4f} | "
            f"{_cell(r['trainable_params'], ',')} | {_cell(r['trainable_share'], '.2%')} | "
            f"{_cell(r['seconds_per_step'], '.3f')} | {_cell(r['peak_rss_mb'], '.0f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="scratch", help="the finetune.backbones key every method changes")
    parser.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    args = parser.parse_args(argv)
    table = methods(args.backbone)
    chosen = args.methods.split(",") if args.methods else list(table)
    unknown = [m for m in chosen if m not in table]
    if unknown:
        parser.error(f"--methods: unknown {unknown} (known: {list(table)})")
    rows = []
    for name in chosen:
        print(f"toolbox: {name} {' '.join(table[name])}", flush=True)
        ok, error = run_experiment(EXPERIMENT_PREFIX + name, table[name])
        rows.append(
            row(name, table[name], args.backbone) if ok else {"method": name, "overrides": table[name], "status": error}
        )
        print(f"toolbox: {name}: {rows[-1].get('accuracy', rows[-1]['status'])}", flush=True)
    command = (
        DEFAULT_COMMAND
        if argv is None and len(sys.argv) == 1
        else "python -m studies.toolbox " + " ".join(argv if argv is not None else sys.argv[1:])
    )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "toolbox.json").write_text(json.dumps({"backbone": args.backbone, "rows": rows}, indent=2) + "\n")
    (OUT / "toolbox.md").write_text(markdown(rows, args.backbone, command))
    print((OUT / "toolbox.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
