"""``python -m datalora <command>``: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand modules; each exposes ``add_parser(subparsers)`` (or ``add_<name>_parser``)
# registering its subcommand with ``func`` set to the function that runs it
COMMAND_MODULES = ("datalora.demo", "datalora.train", "datalora.tle", "datalora.titok")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="datalora", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real import error inside the module
                raise
            continue
        short = name.rsplit(".", 1)[-1]
        add = getattr(module, "add_parser", None) or getattr(module, f"add_{short}_parser")
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
