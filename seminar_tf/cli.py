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
import contextlib
import difflib
import json
import logging
import math
import os
import re
import sys
import time

log = logging.getLogger("seminar")


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


# ---------------------------------------------------------------------------------------------
# quiet by default
# ---------------------------------------------------------------------------------------------
_QUIET_LOGGERS = {  # third-party loggers and the level they keep when not -v
    "apache_beam": logging.WARNING,
    "apache_beam.runners.portability.local_job_service": logging.ERROR,
    "apitools": logging.ERROR,
    "google.auth": logging.ERROR,
    "google_auth_httplib2": logging.ERROR,
    "oauth2client": logging.ERROR,
    "faiss": logging.ERROR,
    "absl": logging.WARNING,
    "tensorflow": logging.ERROR,
}
_QUIET_WARNINGS = r"(keras|tensorflow|tf_keras|apache_beam|google|absl|faiss|pyarrow|sklearn)(\.|$)"


@contextlib.contextmanager
def _stderr_fd_to_devnull():
    """Points file descriptor 2 at /dev/null (C++ logs) for the block; Python's sys.stderr
    writes there too, so nothing of ours may be logged inside."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader:
    """Runs a module's loader with fd 2 on /dev/null: TensorFlow's shared libraries log a
    few lines at load time (oneDNN, CUDA stubs), before TF_CPP_MIN_LOG_LEVEL is applied."""

    def __init__(self, inner, finder):
        self._inner, self._finder = inner, finder

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._finder)  # once: the import is happening
        module.__loader__ = module.__spec__.loader = self._inner
        with _stderr_fd_to_devnull():
            self._inner.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _QuietTensorFlowImport:
    """A ``sys.meta_path`` finder: the first ``import tensorflow`` (wherever it happens, if it
    happens) loads with C++ start-up logging discarded; then the finder removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


class _LibraryFilter(logging.Filter):
    """Drops third-party messages logged on the root logger (``logging.warning(...)`` at
    import time, e.g. Beam's "apitools not found") below ERROR."""

    def filter(self, record):
        return record.name != "root" or record.levelno >= logging.ERROR


def _setup_logging(verbose: bool) -> None:
    """Logging and library noise: our ``seminar.*`` stage lines at INFO and the libraries'
    warnings; with ``verbose``, everything at DEBUG (Beam at INFO) and TensorFlow's C++ logs
    as TensorFlow's environment sets them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        for noisy in ("apache_beam", "urllib3", "matplotlib", "h5py", "PIL"):
            logging.getLogger(noisy).setLevel(logging.INFO)
        return
    # Set before TensorFlow is imported (nothing imports it before main runs): 3 drops the
    # C++ INFO/WARNING/ERROR lines, e.g. "failed call to cuInit ... (303)" on a machine without
    # a GPU and oneDNN's int64 fallback note. A value the user set is kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryFilter())
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    import warnings

    warnings.filterwarnings("ignore", module=_QUIET_WARNINGS)


# ---------------------------------------------------------------------------------------------
# option checks
# ---------------------------------------------------------------------------------------------
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


def closed_fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(float, text, "a fraction in [0, 1]", lambda v: 0 <= v <= 1)


def _did_you_mean(name: str, known) -> str:
    match = difflib.get_close_matches(name, sorted(set(known)), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _option_strings(parser: argparse.ArgumentParser) -> list:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def _refuse_unknown(extra: list, known: list) -> None:
    """UsageError for the first of ``extra`` (unparsed arguments): an unknown option, with
    the closest of ``known``, or a stray value."""
    for arg in extra:
        if arg.startswith("-") and arg not in ("-", "--"):
            name = arg.split("=", 1)[0]
            raise UsageError(f"unknown option {name}{_did_you_mean(name, known)}")
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


def _check_beam_options(extra: list, ours: list) -> None:
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
            _refuse_unknown(unknown, ours + _option_strings(parser))


class _HelpFormatter(argparse.HelpFormatter):
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


class _Parser(argparse.ArgumentParser):
    """Our parsers: no abbreviated options (``--epoch`` is refused, not taken for
    ``--epochs``; Beam's options pass through whole), defaults in ``--help``, ``-v`` on every
    command, and errors as one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
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


# ---------------------------------------------------------------------------------------------
# seminar data synth
# ---------------------------------------------------------------------------------------------
def _cmd_synth(args, extra) -> int:
    from seminar_tf.data import synth

    if args.min_events > args.max_events:
        raise UsageError(f"--min-events {args.min_events} exceeds --max-events {args.max_events}")
    cfg = synth.SynthConfig(
        num_users=args.users,
        num_items=args.items,
        min_events=args.min_events,
        max_events=args.max_events,
        seed=args.seed,
    )
    t0 = time.time()
    tables = synth.generate(cfg)
    n = tables["events"].num_rows
    log.info(
        "synth: generated %d events, %d items in %.1fs",
        n,
        tables["items"].num_rows,
        time.time() - t0,
    )
    t1 = time.time()
    paths = synth.write(tables, args.out, fmt=args.format)
    log.info("synth: wrote %s in %.1fs", ", ".join(sorted(paths.values())), time.time() - t1)
    print(json.dumps({"events": n, "items": tables["items"].num_rows, "files": paths}))
    return 0


# ---------------------------------------------------------------------------------------------
# seminar preprocess
# ---------------------------------------------------------------------------------------------
def _cmd_preprocess(args, beam_args) -> int:
    from preprocessing.output import check_output, discard, prepare_output
    from preprocessing.pipeline import PreprocessConfig, run
    from seminar_tf.data import movielens
    from seminar_tf.data.readers import DataError, resolve_files, write_tables

    try:
        check_output(args.out, args.overwrite)  # before any reading: refuse in one line
    except DataError as e:
        raise UsageError(str(e)) from None
    layout = None
    if args.format == "movielens":
        src = args.events
        t0 = time.time()
        # The converted tables go into the run's own (temporary) directory: they land in
        # OUT/raw with the rest, and an existing OUT is refused before converting.
        try:
            layout = prepare_output(args.out, args.overwrite)
        except DataError as e:
            raise UsageError(str(e)) from None
        try:
            tables, counts = movielens.load(src)
            paths = write_tables(tables, os.path.join(layout.tmp, "raw"))
        except BaseException:
            discard(layout)
            raise
        log.info(
            "movielens: %d ratings -> events (%d with a tag as query, %d tags without rating "
            "dropped), %d items, in %.1fs",
            counts["ratings"],
            counts["events_with_query"],
            counts["tags_without_rating"],
            tables["items"].num_rows,
            time.time() - t0,
        )
        events, items = [paths["events"]], [paths["items"]]
        queries = [paths["queries"]] if "queries" in paths else []
    else:
        if not args.items:
            raise UsageError("--items is required (unless --format movielens)")
        events = resolve_files(args.events, "events")
        items = resolve_files(args.items, "items")
        queries = resolve_files(args.queries, "queries") if args.queries else []
    split_times = ()
    if args.split_times:
        try:
            split_times = tuple(int(t) for t in args.split_times.split(","))
        except ValueError:
            raise UsageError("--split-times takes two integers: T_VALID,T_TEST") from None
    try:
        cfg = PreprocessConfig(
            events=events,
            items=items,
            queries=queries,
            out_dir=args.out,
            max_len=args.max_len,
            max_query_tokens=args.max_query_tokens,
            max_attributes=args.max_attributes,
            chunk_size=args.chunk_size,
            split=args.split,
            valid_fraction=args.valid_fraction,
            test_fraction=args.test_fraction,
            split_times=split_times,
            min_counts={
                "item": args.min_item_count,
                "attribute": args.min_attribute_count,
                "query_token": args.min_token_count,
                "query": args.min_query_count,
            },
            overwrite=args.overwrite,
            timestamp_unit=args.timestamp_unit,
            min_timestamp=args.min_timestamp,
            max_timestamp=args.max_timestamp,
            max_reject_fraction=args.max_reject_fraction,
            list_separator=args.list_separator,
            max_query_chars=args.max_query_chars,
            num_shards=args.num_shards,
        )
    except ValueError as e:
        if layout is not None:
            discard(layout)
        raise UsageError(str(e)) from None
    log.info(
        "preprocess: %d event file(s), %d item file(s) -> %s", len(events), len(items), args.out
    )
    try:
        stats = run(cfg, beam_args, layout=layout)
    except DataError as e:
        # An existing/unsuitable --out, or a job whose input was mostly rejected (its run
        # kept as OUT.failed-<run_id>): one line.
        raise UsageError(str(e)) from None
    log.info(
        "preprocess: %d events in, %d used, %d rejected; %d users; targets %s; "
        "%.1f bytes/event; %.1fs (%.0f events/s)",
        stats["input_events"],
        stats["used_events"],
        stats["rejected_events"],
        stats["users"],
        stats["targets_per_split"],
        stats["output_bytes_per_event"],
        stats["seconds"],
        stats["events_per_second"],
    )
    if not stats["accounting_ok"]:
        raise UsageError("record accounting failed: input != used + rejected (see stats.json)")
    print(
        json.dumps(
            {
                k: stats[k]
                for k in (
                    "input_events",
                    "used_events",
                    "rejected_events",
                    "users",
                    "targets_per_split",
                )
            }
        )
    )
    return 0


# ---------------------------------------------------------------------------------------------
# seminar pretrain / train / evaluate
# ---------------------------------------------------------------------------------------------
def _train_config(args):
    """The run's TrainConfig, every field and model setting checked (before TensorFlow is
    imported: seminar_tf.train_config is plain Python)."""
    from seminar_tf.train_config import ConfigError, TrainConfig, check_model_config

    model_overrides = {}
    if getattr(args, "preset", None):
        model_overrides["preset"] = args.preset
    try:
        cfg = TrainConfig.from_file(
            args.config,
            epochs=args.epochs,
            batch_size=args.batch_size,
            max_len=args.max_len,
            seed=args.seed,
            steps_per_epoch=args.steps_per_epoch,
            learning_rate=args.learning_rate,
            distribute=args.distribute,
        )
        cfg.model = {**cfg.model, **model_overrides}
        check_model_config(cfg.model, "psu" if args.command == "pretrain" else "ctr")
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--config: {e}") from None
    except ConfigError as e:  # names the file (from_file) or the model setting
        raise UsageError(str(e)) from None
    return cfg


def _check_data_dir(path: str) -> None:
    from seminar_tf import spec
    from seminar_tf.data.manifest import verify_output
    from seminar_tf.data.readers import DataError

    if not os.path.exists(os.path.join(path, spec.SCHEMA_FILE)):
        raise UsageError(f"{path}: not a `seminar preprocess` output (no {spec.SCHEMA_FILE})")
    try:
        # One complete run: no shards of another run, nothing missing or resized.
        verify_output(path)
    except DataError as e:
        raise UsageError(str(e)) from None


def _cmd_fit(args, extra) -> int:
    """``seminar pretrain`` (PSU) and ``seminar train`` (CTR): fit, then print the last
    epoch's logs as one JSON line."""
    cfg = _train_config(args)
    _check_data_dir(args.data)
    pretrained = getattr(args, "pretrained", None)
    if pretrained and not os.path.exists(os.path.join(pretrained, "model.keras")):
        raise UsageError(f"--pretrained {pretrained}: no model.keras (run seminar pretrain)")
    from seminar_tf import training

    if args.command == "pretrain":
        _, history = training.pretrain(args.data, args.out, cfg)
    else:
        _, history = training.train(args.data, args.out, cfg, pretrained=pretrained)
    print(json.dumps({k: round(float(v[-1]), 5) for k, v in history.items()}))
    return 0


def _cmd_quantize(args, extra) -> int:
    _check_data_dir(args.data)
    if not os.path.exists(os.path.join(args.model, "model.keras")):
        raise UsageError(f"--model {args.model}: no model.keras (run seminar train)")
    from seminar_tf import training

    report = training.quantize(
        args.data, args.model, args.out, num_subvectors=args.subvectors,
        num_centroids=args.centroids, max_vectors=args.max_vectors, seed=args.seed,
    )  # fmt: skip
    print(json.dumps(report["valid_gsu_recall"]))
    return 0


def _cmd_evaluate(args, extra) -> int:
    _check_data_dir(args.data)
    from seminar_tf import training

    report = training.evaluate(
        args.data, args.model, split=args.split, batch_size=args.batch_size,
        num_negatives=args.negatives, max_ranked=args.max_ranked, seed=args.seed,
    )  # fmt: skip
    if args.report_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.report_json)), exist_ok=True)
        with open(args.report_json, "w") as f:
            json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


# ---------------------------------------------------------------------------------------------
# seminar export / serve / query / score (export/ and serving/ hold the work)
# ---------------------------------------------------------------------------------------------
def _cmd_export(args, extra) -> int:
    from export.writer import export_models

    t0 = time.time()
    result = export_models(
        args.model, args.out, version=args.version, max_len=args.max_len, data_dir=args.data,
        serving_base_path=args.serving_base_path,
    )  # fmt: skip
    log.info("export: version %s of %s in %.1fs", result.version, ", ".join(sorted(result.paths)),
             time.time() - t0)  # fmt: skip
    print(json.dumps({"version": result.version, "models": result.paths,
                      "models_config": result.models_config,
                      "batching_parameters": result.batching_parameters}))  # fmt: skip
    return 0


def _cmd_serve(args, extra) -> int:
    from serving.local_server import LocalServer

    server = LocalServer.from_export(
        args.export, grpc_port=args.grpc_port, rest=args.rest_port is not None,
        rest_port=args.rest_port or 0, host=args.host,
    )  # fmt: skip
    log.info("serve: gRPC on %s, REST on %s (Ctrl-C stops)", server.grpc_target, server.rest_url)
    print(json.dumps({"grpc": server.grpc_target, "rest": server.rest_url}), flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *_: server.stop())
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


def _cmd_query(args, extra) -> int:
    from serving.client import CascadeClient, ServingError

    try:
        with open(args.request) as f:
            request = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--request: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("candidates"), list):
        raise UsageError('--request: expects {"history": [...], "candidates": [...]}')
    client = CascadeClient(args.server, protocol=args.protocol, timeout_s=args.timeout)
    try:
        ranked = client.rank_candidates(request.get("history", []), request["candidates"])
    except ServingError as e:
        raise UsageError(str(e)) from None
    finally:
        client.close()
    print(json.dumps({"ranked": ranked}, indent=2))
    return 0


def _cmd_score(args, beam_args) -> int:
    _check_data_dir(args.data)
    from serving.scoring import score

    stats = score(args.data, args.export, args.out, split=args.split,
                  batch_size=args.batch_size, beam_args=beam_args)  # fmt: skip
    print(json.dumps(stats))
    return 0


def _add_train_args(p, with_pretrained: bool) -> None:
    p.add_argument("--data", required=True, help="a `seminar preprocess` output directory")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--config", help="JSON file of TrainConfig fields (model settings in 'model')")
    p.add_argument("--epochs", type=positive_int, help="passes over the data (default: 1)")
    p.add_argument("--batch-size", type=positive_int, help="examples per step (default: 256)")
    p.add_argument(
        "--max-len", type=positive_int, help="longest history (default: preprocessing's)"
    )
    p.add_argument("--seed", type=seed, help="random seed (default: 0)")
    p.add_argument(
        "--steps-per-epoch", type=positive_int, help="steps per epoch (default: one pass)"
    )
    p.add_argument(
        "--learning-rate", type=positive_float, help="Adam learning rate (default: 0.001)"
    )
    p.add_argument(
        "--distribute", choices=("none", "mirrored"), help="tf.distribute strategy (default: none)"
    )
    if with_pretrained:
        p.add_argument("--pretrained", help="a `seminar pretrain` model directory")
        p.add_argument("--preset", help="model preset: seminar, twin, sim, eta, din, dnn, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="seminar", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    synth = data_sub.add_parser("synth", help="write synthetic lifelong data in the contract")
    synth.add_argument("--out", required=True, help="directory to write the tables to")
    synth.add_argument("--users", type=positive_int, default=2000, help="number of users")
    synth.add_argument("--items", type=positive_int, default=5000, help="catalog size")
    synth.add_argument("--min-events", type=positive_int, default=20, help="fewest events a user")
    synth.add_argument("--max-events", type=positive_int, default=2000, help="most events a user")
    synth.add_argument("--seed", type=seed, default=0, help="random seed")
    synth.add_argument(
        "--format", choices=("parquet", "csv", "jsonl"), default="parquet", help="file format"
    )
    synth.set_defaults(func=_cmd_synth)

    pre = sub.add_parser(
        "preprocess",
        help="raw events + items -> sequence examples (Beam; unknown options go to Beam)",
    )
    pre.add_argument("--events", required=True, help="file or folder (or the MovieLens folder)")
    pre.add_argument("--items", help="file or folder of the item catalog")
    pre.add_argument("--queries", help="optional file or folder of query vectors")
    pre.add_argument("--out", required=True, help="output directory of the sequence examples")
    pre.add_argument(
        "--format", choices=("contract", "movielens"), default="contract",
        help="input layout: the data contract, or a MovieLens folder",
    )  # fmt: skip
    pre.add_argument("--max-len", type=positive_int, default=1000, help="longest history kept")
    pre.add_argument(
        "--max-query-tokens", type=positive_int, default=5, help="query tokens kept per event"
    )
    pre.add_argument(
        "--max-attributes", type=positive_int, default=8, help="attributes kept per item"
    )
    pre.add_argument(
        "--chunk-size", type=positive_int, default=10_000, help="events per stored Example"
    )
    pre.add_argument(
        "--split", choices=("time", "last"), default="time",
        help="time: global time cutoffs; last: per user, last event test, the one before valid",
    )  # fmt: skip
    pre.add_argument(
        "--valid-fraction", type=fraction, default=0.1, help="share of targets for validation"
    )
    pre.add_argument(
        "--test-fraction", type=fraction, default=0.1, help="share of targets for test"
    )
    pre.add_argument("--split-times", help="explicit cutoffs T_VALID,T_TEST (seconds)")
    pre.add_argument(
        "--min-item-count", type=positive_int, default=1, help="rarer items map to OOV"
    )
    pre.add_argument(
        "--min-attribute-count", type=positive_int, default=1,
        help="rarer attributes map to OOV",
    )  # fmt: skip
    pre.add_argument(
        "--min-token-count", type=positive_int, default=2, help="rarer query tokens map to OOV"
    )
    pre.add_argument(
        "--min-query-count", type=positive_int, default=1, help="rarer queries map to OOV"
    )
    pre.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing --out (only after the new run succeeds)",
    )  # fmt: skip
    pre.add_argument(
        "--timestamp-unit", choices=("s", "ms", "us", "ns"), default="s",
        help="unit of numeric event timestamps (converted to seconds; typed Parquet "
        "timestamps/dates are converted by their own type)",
    )  # fmt: skip
    pre.add_argument(
        "--min-timestamp", type=int, default=0,
        help="earliest plausible event time, seconds since the epoch (inclusive); earlier "
        "events are rejected",
    )  # fmt: skip
    pre.add_argument(
        "--max-timestamp", type=int, default=4_102_444_800,
        help="latest plausible event time, seconds since the epoch (exclusive; default "
        "2100-01-01); later events are rejected",
    )  # fmt: skip
    pre.add_argument(
        "--max-reject-fraction", type=float, default=0.5,
        help="fail the job when more than this fraction of the events (or items, or query "
        "vectors) is rejected; a job with no event used always fails",
    )  # fmt: skip
    pre.add_argument(
        "--list-separator",
        help="CSV list cells are values joined by this (e.g. '|' for Drama|Comedy); default: "
        "JSON arrays",
    )  # fmt: skip
    pre.add_argument(
        "--max-query-chars", type=int, default=1000,
        help="longest query accepted (characters); longer ones are rejected as query_too_long",
    )  # fmt: skip
    pre.add_argument(
        "--num-shards", type=int, default=0,
        help="number of examples/part-*.tfrecord files (0: the runner decides)",
    )  # fmt: skip
    pre.set_defaults(func=_cmd_preprocess, passes_extra=True)  # unknown options go to Beam

    pt = sub.add_parser("pretrain", help="pretrain the PSU (three tasks)")
    _add_train_args(pt, with_pretrained=False)
    pt.set_defaults(func=_cmd_fit)
    tr = sub.add_parser("train", help="train the CTR model (optionally from a pretrained PSU)")
    _add_train_args(tr, with_pretrained=True)
    tr.set_defaults(func=_cmd_fit)
    qz = sub.add_parser(
        "quantize", help="product-quantize a trained model's first stage (learned codebooks)"
    )
    qz.add_argument("--data", required=True, help="the model's preprocessing output")
    qz.add_argument("--model", required=True, help="a `seminar train` model (search exact)")
    qz.add_argument("--out", required=True, help="model directory to write")
    qz.add_argument(
        "--subvectors", type=positive_int, default=16, help="sub-vectors per modality vector"
    )
    qz.add_argument("--centroids", type=positive_int, default=512, help="centroids per codebook")
    qz.add_argument(
        "--max-vectors", type=positive_int, default=200_000, help="k-means sample per modality"
    )
    qz.add_argument("--seed", type=seed, default=0, help="random seed (k-means, sampling)")
    qz.set_defaults(func=_cmd_quantize)
    ev = sub.add_parser("evaluate", help="AUC, GAUC, logloss, HR@K, NDCG@K on a split")
    ev.add_argument("--data", required=True, help="the model's preprocessing output")
    ev.add_argument("--model", required=True, help="a `seminar train` model directory")
    ev.add_argument("--report-json", help="also write the report to this JSON file")
    ev.add_argument(
        "--split", choices=("train", "valid", "test"), default="test", help="split to evaluate"
    )
    ev.add_argument("--batch-size", type=positive_int, default=512, help="examples per batch")
    ev.add_argument(
        "--negatives", type=positive_int, default=99, help="sampled negatives per positive"
    )
    ev.add_argument(
        "--max-ranked", type=positive_int, help="rank at most this many positives (default: all)"
    )
    ev.add_argument("--seed", type=seed, default=0, help="random seed of the negatives")
    ev.set_defaults(func=_cmd_evaluate)

    ex = sub.add_parser("export", help="SavedModels for TF Serving: retrieval and ranking")
    ex.add_argument("--model", required=True, help="a `seminar train` model directory")
    ex.add_argument("--out", required=True, help="export base directory (versions go under it)")
    ex.add_argument("--version", type=positive_int, help="integer version (default: next free)")
    ex.add_argument(
        "--max-len", type=positive_int, help="longest history searched (default: training's)"
    )
    ex.add_argument("--data", help="the model's preprocessing output (default: from config.json)")
    ex.add_argument("--serving-base-path", help="where --out is on the server, for models.config")
    ex.set_defaults(func=_cmd_export)
    sv = sub.add_parser("serve", help="local stand-in for TF Serving (gRPC + REST) over an export")
    sv.add_argument("--export", required=True, help="a `seminar export` output directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--grpc-port", type=port, default=8500, help="gRPC port (0: any free one)")
    sv.add_argument(
        "--rest-port", type=port, help="also serve the REST API on this port (0: any free one)"
    )
    sv.set_defaults(func=_cmd_serve)
    qu = sub.add_parser("query", help="rank candidates for one history through the cascade")
    qu.add_argument("--server", default="127.0.0.1:8500", help="host:port, or http://host:port")
    qu.add_argument(
        "--protocol", choices=("grpc", "rest"), default="grpc", help="TF Serving API to call"
    )
    qu.add_argument("--request", required=True, help='JSON {"history": [...], "candidates": [...]}')
    qu.add_argument(
        "--timeout", type=positive_float, default=5.0, help="deadline per call, seconds"
    )
    qu.set_defaults(func=_cmd_query)
    sc = sub.add_parser(
        "score", help="batch scoring with the exported cascade (Beam RunInference; unknown "
        "options go to Beam)",
    )  # fmt: skip
    sc.add_argument("--data", required=True, help="a `seminar preprocess` output directory")
    sc.add_argument("--export", required=True, help="a `seminar export` output directory")
    sc.add_argument("--out", required=True, help="directory for scores-*.parquet")
    sc.add_argument(
        "--split", choices=("train", "valid", "test"), default="test", help="split to score"
    )
    sc.add_argument("--batch-size", type=positive_int, default=256, help="examples per call")
    sc.set_defaults(func=_cmd_score, passes_extra=True)  # unknown options go to Beam
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("seminar-tf")
    except metadata.PackageNotFoundError:
        from seminar_tf import __version__

        return __version__


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
    _setup_logging(verbose)
    command = _command_parser(parser, args)
    try:
        if extra:
            ours = _option_strings(command)
            if getattr(args, "passes_extra", False):
                _check_beam_options(extra, ours)
            else:
                _refuse_unknown(extra, ours)
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


if __name__ == "__main__":
    sys.exit(main())
