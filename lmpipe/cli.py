"""`lmpipe`: the user's command line (params check, audit, predict).

Heavy packages are imported inside the commands, so `lmpipe --help` answers at once.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from lmpipe.errors import LmpipeError


def _params_check(args: argparse.Namespace) -> int:
    from lmpipe.params import flatten, load_params

    params = load_params(args.file)
    print(f"{args.file}: OK ({len(flatten(params))} values in {len(type(params).model_fields)} sections)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmpipe", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    params = commands.add_parser("params", help="validate params.yaml without running anything")
    params_sub = params.add_subparsers(dest="params_command", required=True)
    check = params_sub.add_parser("check", help="validate every section of a params file")
    check.add_argument("file", nargs="?", default="params.yaml")
    check.set_defaults(func=_params_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmpipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
