"""The ``seminar`` argument parser: every command, option, default and help line."""

from __future__ import annotations

import argparse

from seminar_tf.cli import commands
from seminar_tf.cli.options import (
    Parser,
    fraction,
    nonneg_int,
    port,
    positive_float,
    positive_int,
    seed,
)
from seminar_tf.train_config import PQ_DEFAULTS


def _add_train_args(p, with_pretrained: bool) -> None:
    p.add_argument("--data", required=True, help="a `seminar preprocess` output directory")
    p.add_argument("--out", required=True, help="model directory to write")
    p.add_argument("--config", help="JSON file of TrainConfig fields (model settings in 'model')")
    p.add_argument(
        "--epochs", type=positive_int,
        help="most epochs (default: 20; training early-stops on the validation metric after "
        "--patience epochs without a gain and keeps the best epoch's weights)",
    )  # fmt: skip
    p.add_argument(
        "--patience", type=nonneg_int, help="epochs without a validation gain before stopping "
        "(default: 2)",
    )  # fmt: skip
    p.add_argument(
        "--history", choices=("all", "positive"),
        help="history window: all earlier events with their labels, or earlier clicks only "
        "(default: all; pretrain always uses clicks)",
    )  # fmt: skip
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
        "--distribute",
        choices=("none", "data", "mirrored"),
        help="data: one replica per local device (keras.distribution under JAX, "
        "tf.distribute under TensorFlow), --batch-size per device (default: none)",
    )
    if with_pretrained:
        p.add_argument("--pretrained", help="a `seminar pretrain` model directory")
        p.add_argument("--preset", help="model preset: seminar, twin, sim, eta, din, dnn, ...")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="seminar",
        description="SEMINAR lifelong sequential recommendation: preprocess, train, evaluate, export, serve.",
    )
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
    synth.set_defaults(func=commands.cmd_synth)

    pre = sub.add_parser(
        "preprocess",
        help="raw events + items -> sequence examples (Beam; unknown options go to Beam)",
    )
    pre.add_argument("--events", required=True, help="file or folder (or the MovieLens folder)")
    pre.add_argument("--items", help="file or folder of the item catalog")
    pre.add_argument("--queries", help="optional file or folder of query vectors")
    pre.add_argument(
        "--users", nargs="+", metavar="PATH",
        help="optional users table(s): files or folders with user_id and optional attributes "
        "(list of strings) and embedding (list of floats); checked like the items",
    )  # fmt: skip
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
        "--min-user-count", type=positive_int, default=1,
        help="users with fewer events map to OOV (vocab/users.txt)",
    )  # fmt: skip
    pre.add_argument(
        "--max-user-attributes", type=positive_int, default=8,
        help="attributes kept per user of the --users table",
    )  # fmt: skip
    pre.add_argument(
        "--user-hash-buckets", type=nonneg_int, default=0,
        help="N > 0: map user ids to 2 + farmhash64(user_id) %% N instead of a vocabulary (for "
        "very large user sets; not with --users or --min-user-count); 0: vocabulary",
    )  # fmt: skip
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
    pre.set_defaults(func=commands.cmd_preprocess, passes_extra=True)  # unknown options go to Beam

    pt = sub.add_parser("pretrain", help="pretrain the PSU (three tasks)")
    _add_train_args(pt, with_pretrained=False)
    pt.set_defaults(func=commands.cmd_fit)
    tr = sub.add_parser("train", help="train the CTR model (optionally from a pretrained PSU)")
    _add_train_args(tr, with_pretrained=True)
    tr.set_defaults(func=commands.cmd_fit)
    tu = sub.add_parser(
        "tune", help="search learning rate, weight decay, dropout, embedding size and top_k on "
        "the validation split; writes the best config for `seminar train --config`",
    )  # fmt: skip
    tu.add_argument("--data", required=True, help="a `seminar preprocess` output directory")
    tu.add_argument(
        "--out", required=True,
        help="directory for best.json, trials.json, trials.png and the trials' runs (a rerun "
        "with the same settings resumes)",
    )  # fmt: skip
    tu.add_argument(
        "--preset",
        help="model preset: seminar, twin, sim, eta, din, full_attention, dnn (default: the "
        "--config's model.preset, else seminar)",
    )  # fmt: skip
    tu.add_argument("--trials", type=positive_int, default=10, help="trials (training runs)")
    tu.add_argument(
        "--seed", type=seed,
        help="seed of the values drawn and of every trial's training (default: the --config's, "
        "else 0)",
    )  # fmt: skip
    tu.add_argument(
        "--epochs", type=positive_int,
        help="most epochs per trial (default: the --config's, else 20; each trial early-stops "
        "on validation AUC)",
    )  # fmt: skip
    tu.add_argument(
        "--config", help="JSON file of TrainConfig fields the trials start from (the searched "
        "ones are overridden)",
    )  # fmt: skip
    tu.add_argument(
        "--pretrained", help="a `seminar pretrain` model directory (fixes embedding_dim)"
    )
    tu.set_defaults(func=commands.cmd_tune)
    qz = sub.add_parser(
        "quantize", help="product-quantize a trained model's first stage (learned codebooks)"
    )
    qz.add_argument("--data", required=True, help="the model's preprocessing output")
    qz.add_argument("--model", required=True, help="a `seminar train` model (search exact)")
    qz.add_argument("--out", required=True, help="model directory to write")
    qz.add_argument(
        "--layout", choices=("fused", "sides", "modality"), default=PQ_DEFAULTS["layout"],
        help="what is coded: each behaviour's fused GSU key; its item side and query (codes "
        "in per-item and per-query tables); or each modality (SEMINAR's multi-modal codes)",
    )  # fmt: skip
    qz.add_argument(
        "--rotation", action=argparse.BooleanOptionalAction, default=PQ_DEFAULTS["rotation"],
        help="learn an OPQ rotation (faiss) before splitting each coded vector",
    )  # fmt: skip
    qz.add_argument(
        "--subvectors", type=positive_int, default=None,
        help=f"sub-vectors per coded vector (default {PQ_DEFAULTS['num_subvectors']}, or the "
        "largest power of two below it that divides the model's embedding size)",
    )  # fmt: skip
    qz.add_argument(
        "--centroids", type=positive_int, default=PQ_DEFAULTS["num_centroids"],
        help="centroids per codebook (<= 256: one byte a code)",
    )  # fmt: skip
    qz.add_argument(
        "--score-aware", action=argparse.BooleanOptionalAction,
        default=PQ_DEFAULTS["score_aware"],
        help="weight k-means towards the directions the targets score (the coded vectors "
        "multiplied by S^(1/4), S the second moment of the targets' score forms)",
    )  # fmt: skip
    qz.add_argument(
        "--shortlist", type=positive_int, default=PQ_DEFAULTS["shortlist"],
        help="keep the top SHORTLIST x K behaviours by their codes and re-rank them by the "
        "exact score, embedding them again from their ids (1: no re-rank)",
    )  # fmt: skip
    qz.add_argument(
        "--max-vectors",
        type=positive_int,
        default=200_000,
        help="distinct vectors per coded vector to fit k-means on (read from 40 batches of "
        "training histories at most)",
    )
    qz.add_argument("--seed", type=seed, default=0, help="random seed (k-means, sampling)")
    qz.set_defaults(func=commands.cmd_quantize)
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
    ev.set_defaults(func=commands.cmd_evaluate)

    ex = sub.add_parser("export", help="SavedModels for TF Serving: retrieval and ranking")
    ex.add_argument("--model", required=True, help="a `seminar train` model directory")
    ex.add_argument("--out", required=True, help="export base directory (versions go under it)")
    ex.add_argument("--version", type=positive_int, help="integer version (default: next free)")
    ex.add_argument(
        "--max-len", type=positive_int, help="longest history searched (default: training's)"
    )
    ex.add_argument("--data", help="the model's preprocessing output (default: from config.json)")
    ex.add_argument("--serving-base-path", help="where --out is on the server, for models.config")
    ex.set_defaults(func=commands.cmd_export)
    sv = sub.add_parser("serve", help="local stand-in for TF Serving (gRPC + REST) over an export")
    sv.add_argument("--export", required=True, help="a `seminar export` output directory")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sv.add_argument("--grpc-port", type=port, default=8500, help="gRPC port (0: any free one)")
    sv.add_argument(
        "--rest-port", type=port, help="also serve the REST API on this port (0: any free one)"
    )
    sv.set_defaults(func=commands.cmd_serve)
    qu = sub.add_parser("query", help="rank candidates for one history through the cascade")
    qu.add_argument("--server", default="127.0.0.1:8500", help="host:port, or http://host:port")
    qu.add_argument(
        "--protocol", choices=("grpc", "rest"), default="grpc", help="TF Serving API to call"
    )
    qu.add_argument(
        "--request", required=True,
        help='JSON {"history": [...], "candidates": [...], "user_id"?: "...", "user_counts"?: '
        "[events, clicks, seconds since the latest]}",
    )  # fmt: skip
    qu.add_argument(
        "--timeout", type=positive_float, default=5.0, help="deadline per call, seconds"
    )
    qu.set_defaults(func=commands.cmd_query)
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
    sc.set_defaults(func=commands.cmd_score, passes_extra=True)  # unknown options go to Beam
    return parser


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("seminar-tf")
    except metadata.PackageNotFoundError:
        from seminar_tf import __version__

        return __version__
