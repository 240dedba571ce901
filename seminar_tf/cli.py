"""The ``seminar`` command line.

Errors a user can fix (bad paths, bad options, bad data) exit non-zero with one readable line;
unknown options of ``seminar preprocess`` go to Beam, so ``--runner=DataflowRunner --project
...`` works unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

log = logging.getLogger("seminar")


class UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # Beam and absl are chatty at INFO; keep our stage lines readable.
    for noisy in ("apache_beam", "absl", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("apache_beam.runners.portability.local_job_service").setLevel(logging.ERROR)


# ---------------------------------------------------------------------------------------------
# seminar data synth
# ---------------------------------------------------------------------------------------------
def _cmd_synth(args, extra) -> int:
    from seminar_tf.data import synth

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
    from preprocessing.pipeline import PreprocessConfig, run
    from seminar_tf.data import movielens
    from seminar_tf.data.readers import resolve_files, write_tables

    if args.format == "movielens":
        src = args.events
        t0 = time.time()
        tables, counts = movielens.load(src)
        paths = write_tables(tables, os.path.join(args.out, "raw"))
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
        )
    except ValueError as e:
        raise UsageError(str(e)) from None
    log.info(
        "preprocess: %d event file(s), %d item file(s) -> %s", len(events), len(items), args.out
    )
    stats = run(cfg, beam_args)
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
    from seminar_tf.training import TrainConfig

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
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"--config: {e}") from None
    cfg.model = {**cfg.model, **model_overrides}
    return cfg


def _check_data_dir(path: str) -> None:
    from seminar_tf import spec

    if not os.path.exists(os.path.join(path, spec.SCHEMA_FILE)):
        raise UsageError(f"{path}: not a `seminar preprocess` output (no {spec.SCHEMA_FILE})")


def _cmd_fit(args, extra) -> int:
    """``seminar pretrain`` (PSU) and ``seminar train`` (CTR): fit, then print the last
    epoch's logs as one JSON line."""
    _check_data_dir(args.data)
    pretrained = getattr(args, "pretrained", None)
    if pretrained and not os.path.exists(os.path.join(pretrained, "model.keras")):
        raise UsageError(f"--pretrained {pretrained}: no model.keras (run seminar pretrain)")
    from seminar_tf import training

    cfg = _train_config(args)
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

    result = export_models(
        args.model, args.out, version=args.version, max_len=args.max_len, data_dir=args.data,
        serving_base_path=args.serving_base_path,
    )  # fmt: skip
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
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-len", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps-per-epoch", type=int)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--distribute", choices=("none", "mirrored"))
    if with_pretrained:
        p.add_argument("--pretrained", help="a `seminar pretrain` model directory")
        p.add_argument("--preset", help="model preset: seminar, twin, sim, eta, din, dnn, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seminar", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="data utilities")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write synthetic lifelong data in the contract")
    synth.add_argument("--out", required=True)
    synth.add_argument("--users", type=int, default=2000)
    synth.add_argument("--items", type=int, default=5000)
    synth.add_argument("--min-events", type=int, default=20)
    synth.add_argument("--max-events", type=int, default=2000)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=("parquet", "csv", "jsonl"), default="parquet")
    synth.set_defaults(func=_cmd_synth)

    pre = sub.add_parser(
        "preprocess",
        help="raw events + items -> sequence examples (Beam; unknown options go to Beam)",
    )
    pre.add_argument("--events", required=True, help="file or folder (or the MovieLens folder)")
    pre.add_argument("--items", help="file or folder of the item catalog")
    pre.add_argument("--queries", help="optional file or folder of query vectors")
    pre.add_argument("--out", required=True)
    pre.add_argument("--format", choices=("contract", "movielens"), default="contract")
    pre.add_argument("--max-len", type=int, default=1000)
    pre.add_argument("--max-query-tokens", type=int, default=5)
    pre.add_argument("--max-attributes", type=int, default=8)
    pre.add_argument("--chunk-size", type=int, default=10_000)
    pre.add_argument("--split", choices=("time", "last"), default="time")
    pre.add_argument("--valid-fraction", type=float, default=0.1)
    pre.add_argument("--test-fraction", type=float, default=0.1)
    pre.add_argument("--split-times", help="explicit cutoffs T_VALID,T_TEST (seconds)")
    pre.add_argument("--min-item-count", type=int, default=1)
    pre.add_argument("--min-attribute-count", type=int, default=1)
    pre.add_argument("--min-token-count", type=int, default=2)
    pre.add_argument("--min-query-count", type=int, default=1)
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
    qz.add_argument("--subvectors", type=int, default=16, help="sub-vectors per modality vector")
    qz.add_argument("--centroids", type=int, default=512, help="centroids per codebook")
    qz.add_argument("--max-vectors", type=int, default=200_000, help="k-means sample per modality")
    qz.add_argument("--seed", type=int, default=0)
    qz.set_defaults(func=_cmd_quantize)
    ev = sub.add_parser("evaluate", help="AUC, GAUC, logloss, HR@K, NDCG@K on a split")
    ev.add_argument("--data", required=True)
    ev.add_argument("--model", required=True)
    ev.add_argument("--report-json")
    ev.add_argument("--split", choices=("train", "valid", "test"), default="test")
    ev.add_argument("--batch-size", type=int, default=512)
    ev.add_argument("--negatives", type=int, default=99)
    ev.add_argument("--max-ranked", type=int, help="rank at most this many positives")
    ev.add_argument("--seed", type=int, default=0)
    ev.set_defaults(func=_cmd_evaluate)

    ex = sub.add_parser("export", help="SavedModels for TF Serving: retrieval and ranking")
    ex.add_argument("--model", required=True, help="a `seminar train` model directory")
    ex.add_argument("--out", required=True, help="export base directory (versions go under it)")
    ex.add_argument("--version", type=int, help="integer version (default: next free)")
    ex.add_argument("--max-len", type=int, help="longest history searched (default: training's)")
    ex.add_argument("--data", help="the model's preprocessing output (default: from config.json)")
    ex.add_argument("--serving-base-path", help="where --out is on the server, for models.config")
    ex.set_defaults(func=_cmd_export)
    sv = sub.add_parser("serve", help="local stand-in for TF Serving (gRPC + REST) over an export")
    sv.add_argument("--export", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--grpc-port", type=int, default=8500)
    sv.add_argument("--rest-port", type=int, help="also serve the REST API on this port")
    sv.set_defaults(func=_cmd_serve)
    qu = sub.add_parser("query", help="rank candidates for one history through the cascade")
    qu.add_argument("--server", default="127.0.0.1:8500", help="host:port, or http://host:port")
    qu.add_argument("--protocol", choices=("grpc", "rest"), default="grpc")
    qu.add_argument("--request", required=True, help='JSON {"history": [...], "candidates": [...]}')
    qu.add_argument("--timeout", type=float, default=5.0)
    qu.set_defaults(func=_cmd_query)
    sc = sub.add_parser(
        "score", help="batch scoring with the exported cascade (Beam RunInference; unknown "
        "options go to Beam)",
    )  # fmt: skip
    sc.add_argument("--data", required=True, help="a `seminar preprocess` output directory")
    sc.add_argument("--export", required=True, help="a `seminar export` output directory")
    sc.add_argument("--out", required=True, help="directory for scores-*.parquet")
    sc.add_argument("--split", choices=("train", "valid", "test"), default="test")
    sc.add_argument("--batch-size", type=int, default=256)
    sc.set_defaults(func=_cmd_score, passes_extra=True)  # unknown options go to Beam
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    _setup_logging(args.verbose)
    try:
        if extra and not getattr(args, "passes_extra", False):
            raise UsageError(f"unknown options: {' '.join(extra)}")
        return args.func(args, extra)
    except UsageError as e:
        print(f"seminar {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, KeyError) as e:
        if args.verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"seminar {args.command}: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
