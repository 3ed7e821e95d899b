"""`lmpipe`: the user's command line (params check, audit, predict, serve, monitor, generate, compare, sync).

Heavy packages are imported inside the commands, so `lmpipe --help` answers at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from lmpipe.audit.audit import audit_target, format_report
from lmpipe.cli.compare import add_compare_parser
from lmpipe.cli.generate import add_generate_parser
from lmpipe.cli.predict import add_predict_parser
from lmpipe.cli.serve import add_serve_parser
from lmpipe.cli.ui import add_ui_url_parser
from lmpipe.core.errors import LmpipeError
from lmpipe.core.io import load_yaml, user_error
from lmpipe.core.project import default_tracking_uri


def _params_check(args: argparse.Namespace) -> int:

    from lmpipe.core.params import flatten, load_params, unset_keys

    params = load_params(args.file)
    print(f"{args.file}: OK ({len(flatten(params))} values in {len(type(params).model_fields)} sections)")
    unset = unset_keys(load_yaml(Path(args.file).read_text(encoding="utf-8")))
    if unset:
        print(
            f"{args.file}: {len(unset)} key(s) left to the schema default, which DVC does not track "
            f"(write them out to pin them): {', '.join(unset)}"
        )
    return 0


def _audit(args: argparse.Namespace) -> int:
    if args.rebuild:
        return _audit_rebuild(args)
    if args.keep or args.workdir:
        raise LmpipeError("--keep and --workdir go with --rebuild")
    uri = None if args.no_mlflow else (args.tracking_uri or default_tracking_uri(args.project))
    report = audit_target(args.path, project=args.project, tracking_uri=uri)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def _audit_rebuild(args: argparse.Namespace) -> int:
    from lmpipe.audit import copies
    from lmpipe.audit.rebuild import format_rebuild, rebuild
    from lmpipe.core.project import project_root

    root = project_root(args.project)
    target = copies.resolve_inside(args.path, root)
    if target is None and not Path(args.path).is_absolute():
        target = Path(args.path).as_posix()  # not on disk now: the rebuild writes it, relative to the project
    if target is None or copies.is_registered(args.path):
        raise LmpipeError(f"{args.path}: --rebuild reruns an output of the project at {root}, not a copy")
    # dvc's log goes to stderr as it runs, so stdout holds only the report (--json stays parseable)
    report = rebuild(root, target, workdir=args.workdir, keep=args.keep, stream=sys.stderr)
    print(json.dumps(report, indent=2, sort_keys=True) if args.json else format_rebuild(report))
    return report["exit_code"]


def _sync(args: argparse.Namespace) -> int:
    from lmpipe.core.project import project_root
    from lmpipe.core.spool import spool_dir
    from lmpipe.core.tracking import reachable, sync_spool

    root = project_root(args.project)
    uri = args.tracking_uri or default_tracking_uri(root)
    pending = sorted(spool_dir(root).glob("*.jsonl"))
    if not pending:
        print(f"{spool_dir(root)}: nothing to sync")
        return 0
    if not reachable(uri):
        raise LmpipeError(f"{uri}: MLflow store not reachable; {len(pending)} spooled run(s) kept in {spool_dir(root)}")
    from mlflow.tracking import MlflowClient

    sent = sync_spool(MlflowClient(uri), uri, root)
    left = len(list(spool_dir(root).glob("*.jsonl")))
    print(f"sent {len(sent)} spooled run(s) to {uri}" + (f"; {left} still being written, kept" if left else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser("params", help="validate params.yaml without running anything")
    params_sub = params.add_subparsers(dest="params_command", required=True)
    check = params_sub.add_parser("check", help="validate every section of a params file")
    check.add_argument("file", nargs="?", default="params.yaml")
    check.set_defaults(func=_params_check)

    audit = commands.add_parser(
        "audit",
        help="how was this model made? check every recorded hash against the disk (or rebuild it)",
        description="Walk dvc.lock back from PATH to the raw data: commands, params, input and "
        "output hashes (recomputed from disk), git revision, package versions, MLflow runs. "
        "Exit 1 naming the file when anything no longer matches, or a stage is stale. "
        "With --rebuild: rerun the stages PATH needs in a fresh copy of the sources and compare every "
        "output with dvc.lock; where bytes differ, every metric with a bootstrap CI against the "
        "committed run's CI. Exit 0 identical, 3 bytes differ but every metric inside its CI, "
        "4 a metric outside it, 5 bytes differ and no metric to judge (PATH stops before evaluate), "
        "1 the rebuild failed.",
    )
    audit.add_argument(
        "path",
        nargs="?",
        default="models/export",
        help="an output of the project (any path form), a copied model folder, or models:/NAME/VERSION "
        "(default: models/export)",
    )
    audit.add_argument("--json", action="store_true", help="machine-readable report")
    audit.add_argument(
        "--project", "--root", dest="project", help="the project the model came from (default: the one around cwd)"
    )
    audit.add_argument("--tracking-uri", help="MLflow store to look runs up in (default: the project's)")
    audit.add_argument("--no-mlflow", action="store_true", help="skip the MLflow run look-up")
    audit.add_argument(
        "--rebuild", action="store_true", help="rerun the DAG up to PATH in a temporary copy and compare the bytes"
    )
    audit.add_argument("--workdir", help="with --rebuild: rebuild in this new or empty folder (default: a temp one)")
    audit.add_argument("--keep", action="store_true", help="with --rebuild: keep the copy and its log")
    audit.set_defaults(func=_audit)

    sync = commands.add_parser(
        "sync",
        help="send what stages journaled while the MLflow store was down",
        description="Replay every finished run journal in <project>/.lmpipe/spool into the MLflow store, "
        "once (a replayed journal is removed; replaying again creates no second run).",
    )
    sync.add_argument("--project", help="the project whose spool to send (default: the one around cwd)")
    sync.add_argument("--tracking-uri", help="MLflow store to send to (default: the project's)")
    sync.set_defaults(func=_sync)

    add_predict_parser(commands)
    add_serve_parser(commands)
    add_generate_parser(commands)
    add_compare_parser(commands)
    add_ui_url_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LmpipeError, OSError) as exc:
        error = exc if isinstance(exc, LmpipeError) else user_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
