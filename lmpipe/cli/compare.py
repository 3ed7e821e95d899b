"""`lmpipe compare`: one row per pipeline run, the params that differ, the headline with its CI.

A pipeline run is an MLflow run group (tag `lmpipe.group`: a `make repro` timestamp or a DVC
experiment's name). Its `evaluate` run carries every param of the pipeline and the headline
numbers (`headline.*` metrics, the model in tag `lmpipe.headline.model`), so one query over the
project's experiment gives the whole table; the latest finished evaluate run of each group wins.

    lmpipe compare                       # every group, newest first
    lmpipe compare --last 5 --param finetune.backbones.scratch.lr
    lmpipe compare --json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Any

from lmpipe.core.errors import LmpipeError
from lmpipe.core.lineage import TAG_GROUP, TAG_HEADLINE_MODEL, TAG_STAGE
from lmpipe.core.project import default_tracking_uri

HEADLINE = ("acc", "acc_lo", "acc_hi", "f1", "tfidf_acc", "gain")
TEST_PPL = "pretrained.test_mlm_perplexity"
IGNORED_PARAMS = ("base.experiment",)  # names the store, not the model


@dataclass
class Row:
    """One pipeline run: its group, when it ended, its params and its headline numbers."""

    group: str
    run_id: str
    end_time: int
    model: str
    params: dict[str, str] = field(default_factory=dict)
    numbers: dict[str, float] = field(default_factory=dict)


def collect(client: Any, experiment: str, last: int | None = None) -> list[Row]:
    """The latest finished evaluate run of every group with a headline, newest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise LmpipeError(f"MLflow: no experiment {experiment!r} in the store (run `make repro` first)")
    query = f"tags.`{TAG_STAGE}` = 'evaluate' and attributes.status = 'FINISHED'"
    rows: dict[str, Row] = {}
    for run in client.search_runs([found.experiment_id], query, order_by=["attributes.end_time DESC"]):
        group = run.data.tags.get(TAG_GROUP, "")
        if group in rows or "headline.acc" not in run.data.metrics:
            continue  # an older run of the group, or one from before headline metrics existed
        numbers = {k: run.data.metrics[f"headline.{k}"] for k in HEADLINE if f"headline.{k}" in run.data.metrics}
        if TEST_PPL in run.data.metrics:
            numbers["test_ppl"] = run.data.metrics[TEST_PPL]
        rows[group] = Row(
            group,
            run.info.run_id,
            run.info.end_time or 0,
            run.data.tags.get(TAG_HEADLINE_MODEL, "?"),
            dict(run.data.params),
            numbers,
        )
    return list(rows.values())[:last] if last else list(rows.values())


def differing_params(rows: list[Row]) -> list[str]:
    """Params whose value is not the same in every row (a param missing from a row counts as a value)."""
    keys = sorted({k for r in rows for k in r.params} - set(IGNORED_PARAMS))
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def _cell(value: float | None, digits: int = 4, sign: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def table(rows: list[Row], params: list[str]) -> str:
    """A plain-text table, one row per group: the params given, then the headline numbers."""
    # short headers keep a row of one param under 120 columns: tfidf = the baseline's accuracy,
    # ppl = the pretrained encoder's masked-LM perplexity on the test text
    header = ["group", *params, "model", "acc [95% CI]", "f1", "tfidf", "gain", "ppl"]
    lines = [header]
    for r in rows:
        n = r.numbers
        acc = f"{_cell(n.get('acc'))} [{_cell(n.get('acc_lo'))}, {_cell(n.get('acc_hi'))}]"
        lines.append(
            [
                r.group,
                *(r.params.get(p, "-") for p in params),
                r.model,
                acc,
                _cell(n.get("f1")),
                _cell(n.get("tfidf_acc")),
                _cell(n.get("gain"), sign=True),
                _cell(n.get("test_ppl"), 1),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def compare_command(args: argparse.Namespace) -> int:
    """Run `lmpipe compare` from parsed arguments; returns the exit status."""
    from mlflow.tracking import MlflowClient

    rows = collect(MlflowClient(args.tracking_uri or default_tracking_uri()), args.experiment, args.last)
    if not rows:
        raise LmpipeError(f"MLflow experiment {args.experiment!r}: no finished evaluate run with headline metrics")
    params = args.param or differing_params(rows)
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "group": r.group,
                        "run_id": r.run_id,
                        "model": r.model,
                        "params": {p: r.params.get(p) for p in params},
                        **r.numbers,
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
    else:
        print(table(rows, params))
    return 0


def add_compare_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `compare` to an `add_subparsers()` object; the parser's func is `compare_command`."""
    parser = subparsers.add_parser(
        "compare",
        help="one row per pipeline run: the params that differ and the headline with its CI",
        description="Compare pipeline runs (MLflow run groups: `make repro` runs and DVC experiments).",
    )
    parser.add_argument("--experiment", default="lmpipe", help="MLflow experiment (params base.experiment)")
    parser.add_argument("--last", type=int, help="only the newest N groups")
    parser.add_argument("--param", action="append", help="show this param (repeatable; default: those that differ)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    parser.add_argument("--json", action="store_true", help="machine-readable rows")
    parser.set_defaults(func=compare_command)
    return parser
