"""The one entry helper of every `python -m sga_jax.*` command line.

`run(command, argv)` calls the command and turns how it ended into an exit status, as the tools of
this field do:

* the errors a user can cause (`sga_jax.errors.USER_ERRORS`: missing or unreadable files, a
  checkpoint that does not fit, a refused pickle, a config value that cannot work, bad arguments,
  a hub id that does not resolve) print `error: <message>` on one line to stderr, with any detail
  on indented lines below it, and exit with status 2;
* `--debug` (or `SGA_JAX_DEBUG=1`) prints the traceback above that line;
* any other exception is a bug and keeps its traceback;
* Ctrl-C (KeyboardInterrupt) exits with status 130 and no traceback.

Commands parse their arguments either with `ArgumentParser` (argparse: every default shown in
`--help`, the module docstring with its examples as the description, bad arguments raised as
`UsageError`) or with absl flags in their own `flags.FlagValues` (`run_with_flags`: the helper
parses them, loads config files up front so that a bad one is an argument error, and answers
`--help` with the docstring and every flag's default).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from sga_jax.errors import USER_ERRORS, UsageError

DEBUG_ENV = "SGA_JAX_DEBUG"
DEBUG_HELP = f"print the traceback of an error; {DEBUG_ENV}=1 does the same"
MAX_DETAIL_LINES = 12

Command = Callable[[list[str]], "int | None"]


def debug_requested(argv: Sequence[str]) -> bool:
    """Whether `--debug` is among the arguments or SGA_JAX_DEBUG is set to something other than 0."""
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "0").strip().lower() not in ("", "0", "false", "no")


def error_message(error: BaseException) -> str:
    """`error: <first line>` and at most MAX_DETAIL_LINES indented detail lines."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    first, *rest = [line.rstrip() for line in text.strip().splitlines() if line.strip()] or [type(error).__name__]
    detail = ["  " + line.strip() for line in rest]
    if len(detail) > MAX_DETAIL_LINES:
        detail = detail[:MAX_DETAIL_LINES] + [f"  ... ({len(rest) - MAX_DETAIL_LINES} more lines; --debug shows all)"]
    return "\n".join([f"error: {first}", *detail])


def run(command: Command, argv: Sequence[str] | None = None) -> int:
    """Run `command(args)` and return its exit status (see the module docstring).

    argv: the arguments without the program name (default: sys.argv[1:]); the command parses
    them itself (with `ArgumentParser`, or through `run_with_flags`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    try:
        status = command(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as exit_:  # argparse's --help, or a command that exits itself
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        print(error_message(error), file=sys.stderr, flush=True)
        return 2
    return int(status or 0)


def run_with_flags(command: Callable[[Any, list[str]], "int | None"], argv: Sequence[str] | None = None, *,
                   define: Callable[[], Any], doc: str, configs: Sequence[str] = (), positional: str = "") -> int:
    """`run` for a command with absl flags: `define()` builds its `FlagValues` (afresh for every
    call, so that a command can run twice in one process), the arguments are parsed into them
    (`parse_flags`), and the command gets `(flag_values, positional arguments)`; `positional`
    names the positional arguments it takes (e.g. "DATASET"), any other count is a UsageError."""

    def parsed(args: list[str]) -> "int | None":
        flag_values, rest = parse_flags(define, args, doc=doc, configs=configs)
        if len(rest) != len(positional.split()):
            raise UsageError(f"expected {positional or 'no positional arguments'}, got {rest}; see --help")
        return command(flag_values, rest)

    return run(parsed, argv)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout (its examples) and appends every option's default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default is argparse.SUPPRESS or "default" in text or not action.option_strings:
            return text
        default = "none" if action.default in (None, "", []) else "%(default)s"
        return f"{text} (default: {default})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse as every command uses it: `doc` (the module docstring, examples included) as the
    description, defaults in `--help`, a `--debug` flag, and bad arguments raised as UsageError
    (so that `run` prints them as one `error:` line) instead of argparse's usage-and-exit."""

    def __init__(self, prog: str, doc: str, **kwargs: Any):
        super().__init__(prog=prog, description=doc, formatter_class=HelpFormatter, **kwargs)
        self.add_argument("--debug", action="store_true", help=DEBUG_HELP)

    def error(self, message: str) -> None:
        raise UsageError(f"{message} (see {self.prog} --help)")


def parse_flags(define: Callable[[], Any], argv: list[str], *, doc: str,
                configs: Sequence[str] = ()) -> tuple[Any, list[str]]:
    """(absl FlagValues built by `define()` with `argv` parsed into them, the positional arguments).

    `--help` prints `doc` and every flag with its default, then exits 0. The config flags named
    in `configs` (ml_collections) are loaded here, so that a missing file, a bad `--config.a.b=v`
    override or a config function's error is reported as a UsageError naming the flag.
    """
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # libraries (Grain workers, absl logging) read the global flags
    program = os.path.basename(sys.argv[0]) or "sga_jax"
    saved, sys.argv = sys.argv, [program, *argv]  # ml_collections reads `--config.a.b=v` overrides from sys.argv
    try:
        flag_values = define()
        flags.DEFINE_bool("debug", False, DEBUG_HELP, flag_values=flag_values)
        if any(arg in ("-h", "--help", "-help", "--helpshort") for arg in argv):
            print(doc.strip(), "\n\nflags:\n", flag_values.get_help(include_special_flags=False), sep="")
            raise SystemExit(0)
        rest = flag_values(sys.argv)[1:]
        for name in configs:
            if flag_values[name].value is not None:
                flag_values[name].value.keys()  # a config that failed to load raises its error on first use
    except (flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as error:
        raise UsageError(_flag_error(error)) from error
    finally:
        sys.argv = saved
    return flag_values, rest


def _flag_error(error: BaseException) -> str:
    """One readable line for an absl / ml_collections parsing error."""
    if isinstance(error, OSError) and error.__cause__ is not None and "earlier failure to load" in str(error):
        error = error.__cause__  # ml_collections defers a config file's load error: report the original
    cause = error.args[0] if error.args else None
    if isinstance(error, AttributeError) and isinstance(cause, KeyError):
        field = cause.args[0] if cause.args else cause
        return f"a config override names a field the config does not have: {field}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if isinstance(error, OSError) and len(lines) > 1:  # ml_collections lists every path it tried
        return f"cannot load the config file: {lines[-1]}"
    if any(line.startswith("Traceback (most recent call last)") for line in lines):
        # a config function raised: ml_collections pastes its traceback; keep the flag and the last line
        flag = re.match(r"(flag --\S+?): ", lines[0])
        reason = re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
        return f"{flag.group(1)}: {reason}" if flag else reason
    return " ".join(lines) or type(error).__name__


class _StderrHandler(logging.StreamHandler):
    """The handler `log_to_stderr` installs (its type tells that it is installed)."""


def log_to_stderr(level: int = logging.INFO) -> None:
    """Show sga_jax's log messages on stderr (time, module, message), once per process."""
    logger = logging.getLogger("sga_jax")
    if any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        return
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
