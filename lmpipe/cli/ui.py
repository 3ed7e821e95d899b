"""`lmpipe ui-url`: the address of the project's runs table in the MLflow UI (`make ui` prints it).

MLflow 3.17's UI opens an experiment on the view of the browser's workflow type, GenAI until
told otherwise (an empty overview for this project). The address names the runs tab and
`workflowType=machine_learning`, so it opens on the training-runs table: one row per pipeline
run, its stage runs nested under it. The command also tags the experiment as a training one
(`mlflow.experimentKind`), and `--nest` nests the stage runs of a store made before lmpipe
nested them under pipeline runs of their groups.

    lmpipe ui-url                  # http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning
    lmpipe ui-url --port 5055 --nest
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lmpipe.core.project import default_tracking_uri

WORKFLOW = "machine_learning"  # the UI's workflow type whose experiment view is the training-runs table


def runs_url(base: str, experiment_id: str | None) -> str:
    """The runs table of `experiment_id` under the UI at `base` (the experiments list when None)."""
    if experiment_id is None:
        return f"{base.rstrip('/')}/#/experiments?workflowType={WORKFLOW}"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType={WORKFLOW}"


def ui_url_command(args: argparse.Namespace) -> int:
    """Print the runs table's address (notes go to stderr); returns the exit status."""
    from lmpipe.core.tracking import _creates_store

    uri = args.tracking_uri or default_tracking_uri()
    base = f"http://{args.host}:{args.port}"
    if _creates_store(uri):  # no local store yet: opening one would create it
        print(f"{uri}: no store yet (run `make repro` first)", file=sys.stderr)
        print(runs_url(base, None))
        return 0
    from mlflow.tracking import MlflowClient

    from lmpipe.core.tracking import flat_runs, nest_flat_runs

    client = MlflowClient(uri)
    experiment_id = _training_experiment(client, args.experiment)
    if experiment_id is None:
        print(f"MLflow: no experiment {args.experiment!r} in {uri} yet", file=sys.stderr)
    elif args.nest:
        nested = nest_flat_runs(client, experiment_id)
        print(f"nested the stage runs of {len(nested)} group(s) under their pipeline runs", file=sys.stderr)
    elif flat := sorted(group for _, group in flat_runs(client, experiment_id)):
        print(
            f"{len(flat)} group(s) of stage runs from before nesting (e.g. {flat[-1]}) show as flat rows;"
            " `lmpipe ui-url --nest` nests them under pipeline runs",
            file=sys.stderr,
        )
    print(runs_url(base, experiment_id))
    return 0


def _training_experiment(client: Any, experiment: str) -> str | None:
    """The experiment's id, tagged as a training experiment if the store lets us (None if absent)."""
    from lmpipe.core.tracking import mark_training_experiment

    try:
        return mark_training_experiment(client, experiment)
    except Exception as exc:  # e.g. a read-only account on a team server: the address still helps
        print(f"MLflow: could not tag experiment {experiment!r} ({exc})", file=sys.stderr)
        found = client.get_experiment_by_name(experiment)
        return None if found is None else found.experiment_id


def add_ui_url_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `ui-url` to an `add_subparsers()` object; the parser's func is `ui_url_command`."""
    parser = subparsers.add_parser(
        "ui-url",
        help="the MLflow UI's address of the project's runs table (pipeline runs, stages nested)",
        description="Print the address of the project's training-runs table in the MLflow UI (`make ui`).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="where the UI listens (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="the UI's port (default: %(default)s, as `make ui`)")
    parser.add_argument("--experiment", default="lmpipe", help="MLflow experiment (params base.experiment)")
    parser.add_argument("--tracking-uri", help="MLflow store (default: the project's)")
    parser.add_argument(
        "--nest", action="store_true", help="nest stage runs from before nesting under pipeline runs of their groups"
    )
    parser.set_defaults(func=ui_url_command)
    return parser
