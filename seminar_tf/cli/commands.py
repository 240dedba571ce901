"""The bodies of the ``seminar`` commands: each checks its inputs, calls the package, and
prints its result as JSON on stdout (progress goes to stderr)."""

from __future__ import annotations

import json
import logging
import os
import time

from seminar_tf.cli.errors import UsageError

log = logging.getLogger("seminar")


def cmd_synth(args, extra) -> int:
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
def cmd_preprocess(args, beam_args) -> int:
    from preprocessing.output import check_output, discard, prepare_output
    from preprocessing.pipeline import PreprocessConfig, run
    from seminar_tf.data import movielens
    from seminar_tf.data.readers import DataError, resolve_files, write_tables

    try:
        check_output(args.out, args.overwrite)  # before any reading: refuse in one line
    except DataError as e:
        raise UsageError(str(e)) from None
    # The optional users table (any --format), resolved before a MovieLens conversion starts.
    try:
        users = [f for path in args.users or () for f in resolve_files(path, "users")]
    except DataError as e:
        raise UsageError(f"--users: {e}") from None
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
            users=users,
            max_user_attributes=args.max_user_attributes,
            user_hash_buckets=args.user_hash_buckets,
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
                "user": args.min_user_count,
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
def train_config(args):
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
            patience=args.patience,
            history=args.history,
        )
        # `seminar train` without a preset (in --config or --preset) is the seminar preset, as
        # its --help says: the presets' short-term branch comes with it.
        default = {"preset": "seminar"} if args.command == "train" else {}
        cfg.model = {**default, **cfg.model, **model_overrides}
        check_model_config(cfg.model, "psu" if args.command == "pretrain" else "ctr")
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--config: {e}") from None
    except ConfigError as e:  # names the file (from_file) or the model setting
        raise UsageError(str(e)) from None
    return cfg


def check_data_dir(path: str) -> None:
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


def cmd_fit(args, extra) -> int:
    """``seminar pretrain`` (PSU) and ``seminar train`` (CTR): fit, then print the last
    epoch's logs as one JSON line."""
    cfg = train_config(args)
    check_data_dir(args.data)
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


def cmd_tune(args, extra) -> int:
    """``seminar tune``: a search on the validation split; prints the best trial as JSON."""
    from seminar_tf.train_config import ConfigError, TrainConfig, check_model_config

    try:
        cfg = TrainConfig.from_file(args.config, epochs=args.epochs, seed=args.seed)
        if args.preset:
            cfg.model = {**cfg.model, "preset": args.preset}
        check_model_config(cfg.model, "ctr")
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--config: {e}") from None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    check_data_dir(args.data)
    if args.pretrained and not os.path.exists(os.path.join(args.pretrained, "model.keras")):
        raise UsageError(f"--pretrained {args.pretrained}: no model.keras (run seminar pretrain)")
    from seminar_tf import tuning

    report = tuning.tune(args.data, args.out, cfg, args.trials, pretrained=args.pretrained)
    print(json.dumps({k: report[k] for k in ("best_trial", "best_val_auc", "best_params")}
                     | {"best_config": os.path.join(args.out, tuning.BEST_FILE)}))  # fmt: skip
    return 0


def cmd_quantize(args, extra) -> int:
    check_data_dir(args.data)
    if not os.path.exists(os.path.join(args.model, "model.keras")):
        raise UsageError(f"--model {args.model}: no model.keras (run seminar train)")
    from seminar_tf import training

    report = training.quantize(
        args.data, args.model, args.out, num_subvectors=args.subvectors,
        num_centroids=args.centroids, max_vectors=args.max_vectors, seed=args.seed,
        layout=args.layout, rotation=args.rotation, shortlist=args.shortlist,
        score_aware=args.score_aware,
    )  # fmt: skip
    print(json.dumps(report["valid_gsu_recall"]))
    return 0


def cmd_evaluate(args, extra) -> int:
    check_data_dir(args.data)
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
def cmd_export(args, extra) -> int:
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


def cmd_serve(args, extra) -> int:
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


def cmd_query(args, extra) -> int:
    from serving.client import CascadeClient, ServingError

    try:
        with open(args.request) as f:
            request = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--request: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("candidates"), list):
        raise UsageError('--request: expects {"history": [...], "candidates": [...]}')
    user_id = request.get("user_id")
    if user_id is not None and not isinstance(user_id, str):
        raise UsageError(f'--request: "user_id" must be a string, got {user_id!r}')
    client = CascadeClient(args.server, protocol=args.protocol, timeout_s=args.timeout)
    try:
        ranked = client.rank_candidates(
            request.get("history", []), request["candidates"], user_id=user_id,
            user_counts=request.get("user_counts"),
        )  # fmt: skip
    except ServingError as e:
        raise UsageError(str(e)) from None
    finally:
        client.close()
    print(json.dumps({"ranked": ranked}, indent=2))
    return 0


def cmd_score(args, beam_args) -> int:
    check_data_dir(args.data)
    from serving.scoring import score

    stats = score(args.data, args.export, args.out, split=args.split,
                  batch_size=args.batch_size, beam_args=beam_args)  # fmt: skip
    print(json.dumps(stats))
    return 0
