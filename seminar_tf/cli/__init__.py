"""The ``seminar`` command line.

Every option is checked before any work starts; errors a user can fix (bad paths, bad options,
bad config values, bad data) exit non-zero with one readable line, never a traceback (``-v``
shows it). Options of ``seminar preprocess`` and ``seminar score`` that are not ours go to
Beam when Beam knows them (``--runner=DataflowRunner --project ...`` works unchanged); others
are refused with the closest known name. Quiet by default: our stage lines (counts, timings)
only; ``-v`` brings back TensorFlow's, Beam's and the other libraries' logs.
"""

from __future__ import annotations

import argparse
import sys

from seminar_tf.cli.commands import check_data_dir
from seminar_tf.cli.errors import UsageError
from seminar_tf.cli.options import check_beam_options, option_strings, refuse_unknown
from seminar_tf.cli.parser import build_parser
from seminar_tf.cli.quiet import setup_logging

__all__ = ["UsageError", "build_parser", "check_data_dir", "main"]


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the command ``args`` holds (``seminar data synth``: synth's)."""
    for dest in ("command", "data_command"):
        name = getattr(args, dest, None)
        subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if name is None or not subparsers:
            break
        parser = subparsers[0].choices[name]
    return parser


# Errors a user can fix: printed as one line, without the hint to rerun with -v. DataError
# (seminar_tf.data.readers) and ConfigError (seminar_tf.train_config) are ValueErrors.
_USER_ERRORS = (UsageError, ValueError, OSError, KeyError)
_OWN_PACKAGES = ("seminar_tf", "preprocessing", "export", "serving")


def _describe(error: BaseException) -> str:
    """One line: the message's first line, prefixed with the exception's type unless it is
    one of ours (their messages are written to stand alone)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " [...]"
    own = isinstance(error, UsageError) or type(error).__module__.split(".")[0] in _OWN_PACKAGES
    if own and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    setup_logging(verbose)
    command = _command_parser(parser, args)
    try:
        if extra:
            ours = option_strings(command)
            if getattr(args, "passes_extra", False):
                check_beam_options(extra, ours)
            else:
                refuse_unknown(extra, ours)
        return args.func(args, extra)
    except KeyboardInterrupt:
        print(f"{command.prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        user_error = isinstance(e, _USER_ERRORS)
        if verbose:
            import traceback

            traceback.print_exc()
        hint = "" if user_error or verbose else " (run with -v for the traceback)"
        print(f"{command.prog}: error: {_describe(e)}{hint}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
