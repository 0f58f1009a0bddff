"""``python -m datalora <command>``: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import os
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
    """Runs a subcommand. Bad input (a missing file, an invalid value: ``OSError`` /
    ``ValueError``) prints ``datalora <command>: error: ...`` and exits with status 2, like
    a bad flag; ``DATALORA_DEBUG=1`` shows the traceback instead."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (OSError, ValueError) as exc:
        if os.environ.get("DATALORA_DEBUG", "") not in ("", "0"):
            raise
        parser.exit(2, f"datalora {args.command}: error: {exc}\n"
                       f"(DATALORA_DEBUG=1 shows the traceback)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
