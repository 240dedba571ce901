"""Latency and throughput of the exported cascade (retrieve -> rank), in process.

Builds a SEMINAR-sized model (d=64, 4 heads, K=50, MLP 256-128, item text and image vectors of
512 dims, attributes, query text vectors of 512 dims) over a synthetic vocabulary, exports it
with ``seminar export``'s code (max_len 10,000), loads the two SavedModels with
``tf.saved_model.load`` and times the cascade exactly as a client pipes it: the retrieval
signature, then the ranking signature fed with the target and the retrieval's ``kept_*``
outputs. Weights are random: latency does not depend on training.

Grid: batch 1 and 64; L (real behaviours per history) 100, 2,000 and 10,000; the raw
signatures (string ids and query text, looked up and tokenised in the graph) and the encoded
ones (int64 ids); scorers ``exact`` and ``pq`` (the same model with its first stage
product-quantized: 16 sub-vectors x 512 centroids per modality, codebooks by k-means on the
model's own vectors; the request carries the history's stored codes ``hist_pq_codes``,
computed beforehand by the export's ``pq_codes`` signature, as an event store would keep them).
Latency is per cascade call (a batch); throughput is examples per second at that batch.

Usage: python benchmarks/serving.py [--quick] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seminar_tf import spec  # noqa: E402

TARGET_MS = 10.0  # p99 of the cascade at L = 2,000, batch 1
SIZES = {
    "num_items": 20_000,
    "num_users": 10_000,
    "num_attributes": 2_000,
    "num_query_tokens": 20_000,
    "num_queries": 20_000,
    "max_attributes": 8,
    "max_query_tokens": 5,
    "text_dim": 512,
    "image_dim": 512,
    "query_text_dim": 512,
}
MODEL = {"embedding_dim": 64, "num_heads": 4, "top_k": 50, "hidden_units": [256, 128],
         "search": "exact"}  # fmt: skip
PQ = {"num_subvectors": 16, "num_centroids": 512}
MAX_LEN = 10_000


def make_data_dir(root: str, seed: int = 0) -> tuple:
    """A preprocessing-output stand-in: vocabularies, schema.json and side tables."""
    rng = np.random.default_rng(seed)
    s = SIZES
    data_spec = spec.DataSpec(
        num_items=s["num_items"], num_attributes=s["num_attributes"], num_users=s["num_users"],
        num_query_tokens=s["num_query_tokens"], num_queries=s["num_queries"],
        max_attributes=s["max_attributes"], max_query_tokens=s["max_query_tokens"],
        text_dim=s["text_dim"], image_dim=s["image_dim"], query_text_dim=s["query_text_dim"],
        max_len=MAX_LEN,
    )  # fmt: skip
    os.makedirs(os.path.join(root, spec.VOCAB_DIR), exist_ok=True)
    n = spec.NUM_RESERVED_IDS
    tokens = [f"tok{i}" for i in range(s["num_query_tokens"] - n)]
    vocab = {
        "item": [f"item{i:06d}" for i in range(s["num_items"] - n)],
        "user": [f"user{i:06d}" for i in range(s["num_users"] - n)],
        "attribute": [f"attr{i}" for i in range(s["num_attributes"] - n)],
        "query_token": tokens,
        "query": [
            " ".join(rng.choice(tokens, size=rng.integers(1, 5)))
            for _ in range(s["num_queries"] - n)
        ],  # fmt: skip
    }
    vocab["query"] = list(dict.fromkeys(vocab["query"]))  # unique
    while len(vocab["query"]) < s["num_queries"] - n:
        vocab["query"].append(f"extra query {len(vocab['query'])}")
    for kind, values in vocab.items():
        with open(os.path.join(root, spec.VOCAB_DIR, spec.VOCAB_FILES[kind]), "w") as f:
            f.write("".join(v + "\n" for v in values))
    with open(os.path.join(root, spec.SCHEMA_FILE), "w") as f:
        json.dump(data_spec.to_json(), f)
    ni, nq = s["num_items"], s["num_queries"]
    tables = {
        "item_attributes": rng.integers(0, s["num_attributes"], size=(ni, s["max_attributes"])),
        "item_text_vectors": rng.normal(size=(ni, s["text_dim"])).astype(np.float32),
        "item_has_text": (rng.random(ni) < 0.8).astype(np.float32),
        "item_image_vectors": rng.normal(size=(ni, s["image_dim"])).astype(np.float32),
        "item_has_image": (rng.random(ni) < 0.8).astype(np.float32),
        "query_text_vectors": rng.normal(size=(nq, s["query_text_dim"])).astype(np.float32),
        "query_has_text": (rng.random(nq) < 0.8).astype(np.float32),
    }
    return data_spec, tables, vocab


def make_request(vocab: dict, batch: int, length: int, encoded: bool, seed: int = 0) -> dict:
    """A retrieval request: ``length`` real behaviours (a third with a query) plus the leading
    padding slot the client sends; a target with a query half of the time."""
    rng = np.random.default_rng(seed)
    items, queries = np.asarray(vocab["item"], object), np.asarray(vocab["query"], object)
    width = length + 1
    item_idx = rng.integers(0, len(items), size=(batch, width))
    query_idx = rng.integers(0, len(queries), size=(batch, width))
    has_query = rng.random((batch, width)) < 1 / 3
    pad = np.zeros((batch, width), bool)
    pad[:, 0] = True
    t_item = rng.integers(0, len(items), size=batch)
    t_query = rng.integers(0, len(queries), size=batch)
    t_has = rng.random(batch) < 0.5
    label = np.where(pad, 0, rng.integers(0, 2, size=(batch, width))).astype(np.int64)
    a = SIZES["max_attributes"]
    user = rng.integers(0, len(vocab["user"]), size=batch)
    if not encoded:
        return {
            "user_id": np.asarray(vocab["user"], object)[user],
            spec.TARGET_ATTRIBUTES.name: np.full((batch, a), "", object),  # table's attributes
            "target_item": items[t_item].astype(object),
            "target_query": np.where(t_has, queries[t_query], "").astype(object),
            "hist_item": np.where(pad, "", items[item_idx]).astype(object),
            "hist_query": np.where(pad | ~has_query, "", queries[query_idx]).astype(object),
            "hist_label": label,
        }
    q = SIZES["max_query_tokens"]
    n = spec.NUM_RESERVED_IDS
    tok = rng.integers(n, SIZES["num_query_tokens"], size=(batch, width, q))
    tok[..., 2:] = 0
    hist_query = np.where(pad | ~has_query, 0, query_idx + n).astype(np.int64)
    t_q = np.where(t_has, t_query + n, 0).astype(np.int64)
    return {
        "user": (user + n).astype(np.int64),
        spec.TARGET_ATTRIBUTES.name: np.zeros((batch, a), np.int64),
        "target_item": (t_item + n).astype(np.int64),
        "target_query": t_q,
        "target_query_tokens": np.where(t_q[:, None] > 0, tok[:, 0], 0).astype(np.int64),
        "hist_item": np.where(pad, 0, item_idx + n).astype(np.int64),
        "hist_query": hist_query,
        "hist_query_tokens": np.where(hist_query[..., None] > 0, tok, 0).astype(np.int64),
        "hist_label": label,
    }


def add_codes(loaded: dict, request: dict, encoded: bool) -> dict:
    """``request`` plus its history's stored codes, from the export's ``pq_codes`` signature."""
    import tensorflow as tf

    sig = "pq_codes_encoded" if encoded else "pq_codes"
    fn = loaded["retrieval"].signatures[sig]
    names = list(fn.structured_input_signature[1])
    codes = fn(**{n: tf.constant(request[n]) for n in names})[spec.PQ_CODES.name].numpy()
    return {**request, spec.PQ_CODES.name: codes}


def pq_model(model, vocab: dict, seed: int = 0):
    """``model`` with a product-quantized first stage, codebooks fitted on random histories."""
    from seminar_tf.quantization import quantize_model

    sample = [make_request(vocab, 64, 200, encoded=True, seed=seed + i) for i in range(4)]
    copy, _ = quantize_model(model, sample, PQ["num_subvectors"], PQ["num_centroids"])
    return copy


def time_cascade(loaded: dict, request: dict, encoded: bool, min_seconds: float, max_iters: int):
    import tensorflow as tf

    suffix = "_encoded" if encoded else ""
    retrieve = loaded["retrieval"].signatures["retrieve" + suffix]
    rank = loaded["ranking"].signatures["rank" + suffix]
    rank_names = list(rank.structured_input_signature[1])
    features = {k: tf.constant(v) for k, v in request.items()}

    def cascade():
        t0 = time.perf_counter()
        retrieved = retrieve(**features)
        t1 = time.perf_counter()
        ranking = {n: retrieved[n] if n in retrieved else features[n] for n in rank_names}
        probability = rank(**ranking)["probability"].numpy()
        t2 = time.perf_counter()
        assert np.isfinite(probability).all()
        return t1 - t0, t2 - t1, t2 - t0

    for _ in range(3):  # warm up (first calls build the executors)
        cascade()
    times, start = [], time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_seconds or len(times) < 5):
        times.append(cascade())
    t = np.asarray(times) * 1000.0
    return {
        "iterations": len(t),
        "retrieve_p50_ms": float(np.percentile(t[:, 0], 50)),
        "rank_p50_ms": float(np.percentile(t[:, 1], 50)),
        "p50_ms": float(np.percentile(t[:, 2], 50)),
        "p90_ms": float(np.percentile(t[:, 2], 90)),
        "p99_ms": float(np.percentile(t[:, 2], 99)),
        "mean_ms": float(t[:, 2].mean()),
    }


def _nbytes(value) -> int:
    value = np.asarray(value)
    if value.dtype == object:
        return int(sum(len(v) if isinstance(v, (bytes, str)) else 8 for v in value.reshape(-1)))
    return int(value.nbytes)


def write_results(out_dir: str, name: str, report: dict, text: str) -> None:
    """``OUT/<name>.json`` (the report) and ``OUT/<name>.txt`` (the printed table)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.txt"), "w") as f:
        f.write(text + "\n")


def machine() -> dict:
    import keras
    import tensorflow as tf

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads() or "default",
        "load_average_at_start": list(os.getloadavg()),
    }


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines = (("exact", "raw", "-o", "tab:blue"), ("exact", "encoded", "--s", "tab:green"),
             ("pq", "raw", "-^", "tab:orange"), ("pq", "encoded", "--v", "tab:red"))  # fmt: skip
    for ax, batch in zip(axes, sorted({r["batch"] for r in results})):
        for scorer, inputs, style, color in lines:
            rows = sorted((r for r in results if r["batch"] == batch and r["inputs"] == inputs
                           and r["scorer"] == scorer), key=lambda r: r["L"])  # fmt: skip
            if not rows:
                continue
            xs = [r["L"] for r in rows]
            name = f"{scorer} {inputs}"
            ax.plot(xs, [r["p50_ms"] for r in rows], style, color=color, label=f"{name} p50")
            ax.plot(xs, [r["p99_ms"] for r in rows], style, color=color, alpha=0.35,
                    label=f"{name} p99")  # fmt: skip
        if batch == 1:
            ax.axhline(TARGET_MS, color="red", lw=0.8, ls=":", label="target p99 @ L=2000")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("history length L")
        ax.set_ylabel("cascade latency (ms)")
        ax.set_title(f"batch {batch}")
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("exported SEMINAR cascade (retrieve -> rank), exact vs pq first stage, in process")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(results: list) -> str:
    head = (f"{'scorer':7} {'inputs':8} {'batch':>5} {'L':>6} {'p50 ms':>8} {'p90 ms':>8} "
            f"{'p99 ms':>8} {'retr p50':>8} {'rank p50':>8} {'ex/s':>8} {'iters':>5} {'load':>5}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for r in results:
        if r.get("measured") is False:
            lines.append(f"{r['scorer']:7} {'-':8} {'-':>5} {'-':>6}  not measured: {r['reason']}")
            continue
        lines.append(
            f"{r['scorer']:7} {r['inputs']:8} {r['batch']:>5} {r['L']:>6} {r['p50_ms']:>8.2f} "
            f"{r['p90_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['retrieve_p50_ms']:>8.2f} "
            f"{r['rank_p50_ms']:>8.2f} {r['examples_per_sec']:>8.0f} {r['iterations']:>5} "
            f"{r['load_average_1m_before']:>5.2f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--lengths", default="100,2000,10000")
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--scorers", default="exact,pq")
    args = parser.parse_args(argv)
    import tensorflow as tf

    from export.writer import export_model
    from seminar_tf.models import build_model

    lengths = [int(x) for x in args.lengths.split(",")]
    batches = [int(x) for x in args.batches.split(",")]
    scorers = args.scorers.split(",")
    info = machine()
    export_s = {}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = os.path.join(tmp, "data")
        data_spec, tables, vocab = make_data_dir(data_dir)
        exact = build_model(data_spec, MODEL, tables)
        exact.build()
        loaded = {}
        for scorer in scorers:
            model = exact if scorer == "exact" else pq_model(exact, vocab)
            t0 = time.time()
            result = export_model(model, data_dir, os.path.join(tmp, f"export-{scorer}"),
                                  max_len=MAX_LEN, warmup_batch_sizes=(1,))  # fmt: skip
            export_s[scorer] = round(time.time() - t0, 1)
            loaded[scorer] = {m: tf.saved_model.load(p) for m, p in result.paths.items()}
        # Side by side: each (inputs, batch, L) cell runs every scorer in turn.
        for inputs in ("raw", "encoded"):
            for batch in batches:
                for length in lengths:
                    request = make_request(vocab, batch, length, inputs == "encoded")
                    work = batch * length
                    min_s = 0.5 if args.quick else (4.0 if work <= 200_000 else 8.0)
                    iters = 20 if args.quick else (2000 if work <= 200_000 else 60)
                    for scorer in scorers:
                        req = request
                        if scorer == "pq":
                            req = add_codes(loaded[scorer], request, inputs == "encoded")
                        load = os.getloadavg()[0]
                        stats = time_cascade(loaded[scorer], req, inputs == "encoded", min_s, iters)
                        stats["load_average_1m_before"] = round(load, 2)
                        stats.update(scorer=scorer, inputs=inputs, batch=batch, L=length,
                                     examples_per_sec=batch / (stats["mean_ms"] / 1000.0),
                                     request_bytes=int(sum(_nbytes(v) for v in req.values())))  # fmt: skip
                        results.append(stats)
                        print(f"{scorer:5} {inputs:8} B={batch:<3} L={length:<6} "
                              f"p50 {stats['p50_ms']:.2f} ms p99 {stats['p99_ms']:.2f} ms",
                              flush=True)  # fmt: skip
    targets = {
        scorer: next(
            (r for r in results if r["scorer"] == scorer and r["inputs"] == "raw"
             and r["batch"] == 1 and r["L"] == 2000), None,
        )
        for scorer in scorers
    }  # fmt: skip
    target = targets.get("exact") or next(iter(targets.values()))
    info["load_average_at_end"] = list(os.getloadavg())
    report = {
        "benchmark": "serving",
        "what": "exported cascade retrieve -> rank, tf.saved_model.load, in process",
        "machine": info,
        "model": {**MODEL, **SIZES, "max_len": MAX_LEN, "pq": PQ},
        "export_seconds": export_s,
        "target": {
            "L": 2000,
            "batch": 1,
            "inputs": "raw",
            "p99_ms_max": TARGET_MS,
            "p99_ms": target and target["p99_ms"],
            "met": bool(target and target["p99_ms"] <= TARGET_MS),
            "by_scorer": {
                s: {"p99_ms": t and t["p99_ms"], "met": bool(t and t["p99_ms"] <= TARGET_MS)}
                for s, t in targets.items()
            },
        },  # fmt: skip
        "quick": args.quick,
        "results": results,
    }
    text = table(results)
    print(text)
    print(json.dumps(report["target"]))
    write_results(args.out, "serving", report, text)
    plot(results, os.path.join(args.out, "serving.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
