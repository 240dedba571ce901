"""Option checks: range-checked argparse types, unknown options refused with the closest
known name (ours or Beam's), help that shows defaults, errors as one line."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import math
import re
import sys

from seminar_tf.cli.errors import UsageError


def _number(kind, text: str, what: str, ok) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or (kind is float and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"expects {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(int, text, "an integer >= 1", lambda v: v >= 1)


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(int, text, "an integer >= 0", lambda v: v >= 0)


def seed(text: str) -> int:
    """argparse type: a random seed, 0 <= seed < 2**32."""
    return _number(int, text, "an integer in [0, 2**32)", lambda v: 0 <= v < 2**32)


def port(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    return _number(int, text, "a port number in [0, 65535]", lambda v: 0 <= v <= 65535)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    return _number(float, text, "a number > 0", lambda v: v > 0)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return _number(float, text, "a fraction in [0, 1)", lambda v: 0 <= v < 1)


def did_you_mean(name: str, known) -> str:
    match = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def option_strings(parser: argparse.ArgumentParser) -> list:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def refuse_unknown(extra: list, known: list) -> None:
    """UsageError for the first of ``extra`` (unparsed arguments): an unknown option, with
    the closest of ``known``, or a stray value."""
    for arg in extra:
        if arg.startswith("-") and arg not in ("-", "--"):
            name = arg.split("=", 1)[0]
            raise UsageError(f"unknown option {name}{did_you_mean(name, known)}")
    raise UsageError(f"unexpected argument {extra[0]!r}")


def _beam_option_parser():
    """An argparse parser of every Beam pipeline option (all ``PipelineOptions``
    subclasses, as Beam's own ``get_all_options`` collects them) that raises UsageError."""
    from apache_beam.options import pipeline_options as po

    class Parser(po._BeamArgumentParser):
        def error(self, message):
            raise UsageError(f"Beam option: {message}")

    parser = Parser(allow_abbrev=False, add_help=False, conflict_handler="resolve")
    classes, todo = {}, [po.PipelineOptions]
    while todo:
        for cls in todo.pop().__subclasses__():
            key = f"{cls.__module__}.{cls.__qualname__}"
            if key not in classes:
                classes[key] = cls
                todo.append(cls)
    for cls in classes.values():
        with contextlib.suppress(argparse.ArgumentError, TypeError):
            cls._add_argparse_args(parser)
    return parser


def check_beam_options(extra: list, ours: list) -> None:
    """Refuses options that neither we (``ours``) nor Beam know (Beam would only log
    "Unparseable argument" and go on), and Beam options with bad values."""
    _, unknown = _beam_option_parser().parse_known_args(extra)
    if unknown:
        # Options of runners whose module is imported only when the runner is picked.
        for module in ("apache_beam.runners.dataflow.dataflow_runner",
                       "apache_beam.runners.dask.dask_runner"):  # fmt: skip
            with contextlib.suppress(Exception):
                __import__(module)
        parser = _beam_option_parser()
        _, unknown = parser.parse_known_args(extra)
        if unknown:
            refuse_unknown(unknown, ours + option_strings(parser))


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            action.option_strings
            and not action.required
            and not any(default is v for v in (None, False, argparse.SUPPRESS))
            and "%(default)" not in text
            and "default" not in text
        ):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """Our parsers: no abbreviated options (``--epoch`` is refused, not taken for
    ``--epochs``; Beam's options pass through whole), defaults in ``--help``, ``-v`` on every
    command, and errors as one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
            help="debug logs, library and TensorFlow logs, and tracebacks of errors",
        )  # fmt: skip

    def error(self, message):
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)$", message)
        if choice:  # name the closest choice instead of listing them all
            known = re.findall(r"'([^']*)'", choice.group(2))
            match = difflib.get_close_matches(choice.group(1), known, n=1, cutoff=0.6)
            message = (
                message[: choice.start()]
                + f"invalid choice {choice.group(1)!r}"
                + (
                    f" (did you mean {match[0]}?)"
                    if match
                    else f" (choose from {', '.join(known)})"
                )
            )
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)
