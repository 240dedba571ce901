"""First-stage search time per batch of users: the exact GSU scores against the stored codes'
lookup-table scores, each followed by the top-K, at lifelong lengths, on any Keras backend.

    python benchmarks/pq_search_time.py [--lengths 1000 10000 100000] [--batch 1 256]
        [--top-k 50] [--out benchmarks/results]

Rows (median of ``--repeats`` compiled calls after a warm-up, random inputs of the model's
sizes: d = 64, 4 heads), inputs already on the device: ``exact`` scores ``[B, L, d]`` keys
(the vectors already computed: the cheapest exact case) through the scorer's key
projection; ``exact, linear form`` scores them as ``u . k`` (the target folded into one
d-vector, ``PQScorer._linear_form``; the same scores) in float32 and with bfloat16 keys;
``fused S=32`` and ``per modality 5 x 16, C=512`` score ``[B, L, M, S]`` codes (this
project's default and SEMINAR's setting). Each is timed with one plain ``top_k`` over L
and with the exact top-K by blocks (``_ops.top_k_by_blocks``, blocks of 32, what the GSU
uses under JAX at these lengths); ``top-K only`` rows time the top-K of given scores.
Writes ``pq_search_time_<backend>.{json,txt}``. Needs no TensorFlow under JAX (the GPU
machine).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seminar_tf.compiled import compiled  # noqa: E402
from seminar_tf.layers import _ops  # noqa: E402
from seminar_tf.layers.scorers.exact import ExactScorer  # noqa: E402
from seminar_tf.layers.scorers.pq import PQScorer  # noqa: E402

D = 64
CODINGS = {  # label: (layout, modalities, S, C)
    "fused S=32, C=256 (32 B)": ("fused", ("id", "text", "image", "attributes", "query"), 32, 256),
    "per modality 5 x 16, C=512 (160 B)": (
        "modality", ("id", "text", "image", "attributes", "query"), 16, 512),
}  # fmt: skip


def _to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def timed(fn, args, repeats: int) -> float:
    """Median milliseconds of ``fn(*args)`` (outputs pulled to the host), after a warm-up."""
    _to_numpy(fn(*args)[0])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _to_numpy(fn(*args)[0])
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


TOP_KS = {  # how the top-K is found
    "top_k": lambda scores, k: ops.top_k(scores, k),
    "blocks": lambda scores, k: _ops.top_k_by_blocks(scores, k, 32),
}


def run(lengths, batches, top_k: int, repeats: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    exact = ExactScorer(num_heads=4)
    exact.build((None, D), (None, None, D))

    def linear(t, k):  # the exact score u . k + c, the target folded into u
        u, c = PQScorer._linear_form(exact, t)
        return ops.cast(ops.einsum("bd,bld->bl", ops.cast(u, k.dtype), k), "float32") + c[:, None]

    def add(row):
        rows.append(row)
        print(json.dumps(row), flush=True)

    for length in lengths:
        for b in batches:
            # Inputs made on the device: the timing is the search, not a host copy.
            target = keras.random.normal((b, D), seed=seed)
            keys = keras.random.normal((b, length, D), seed=seed + 1)
            mask = ops.ones((b, length), dtype="bool")
            scores = keras.random.normal((b, length), seed=seed + 3)
            methods = {
                "exact": (lambda t, k, m: exact(t, k, m), (target, keys, mask)),
                "exact, linear form": (lambda t, k: linear(t, k), (target, keys)),
                "exact, linear form, bf16 keys": (
                    lambda t, k: linear(t, k),
                    (target, ops.cast(keys, "bfloat16")),
                ),
            }
            for label, (layout, modalities, s, c) in CODINGS.items():
                scorer = PQScorer(modalities=modalities, num_subvectors=s, num_centroids=c,
                                  layout=layout, num_heads=4)  # fmt: skip
                scorer.build((None, D))
                m = len(scorer.groups)
                scorer.set_codebooks(rng.normal(size=(m, s, c, D // s)).astype("float32"))
                codes = keras.random.randint((b, length, m, s), 0, c, seed=seed + 2, dtype="int32")
                weights = ops.full((b, length, m), 1.0 / m, dtype="float32")
                methods[label] = (scorer.score_codes, (target, codes, weights))
                if layout == "fused":
                    # Not the model's path: what a byte per code, stored sub-vector major, and
                    # one gather per sub-vector (no [B, L, S] intermediate) would give.
                    planar = ops.cast(ops.transpose(codes[:, :, 0], (0, 2, 1)), "uint8")

                    def planar_scores(t, p, scorer=scorer, s=s):
                        tables, c = scorer.lookup_tables(t)  # [B, M = 1, S, C]
                        total = c[:, None]
                        for j in range(s):
                            total = total + ops.take_along_axis(
                                tables[:, 0, j], ops.cast(p[:, j], "int32"), axis=1
                            )
                        return total

                    methods[label + ", uint8 planar (not the model's)"] = (
                        planar_scores,
                        (target, planar),
                    )
            for label, (score, args) in methods.items():
                for how, select in TOP_KS.items():

                    def search(*a, score=score, select=select):
                        return select(score(*a), top_k)

                    ms = timed(compiled(search), args, repeats)
                    add({"L": length, "batch": b, "method": label, "top_k": how,
                         "ms": round(ms, 3)})  # fmt: skip
            for how, select in TOP_KS.items():
                ms = timed(compiled(lambda x, select=select: select(x, top_k)), (scores,), repeats)
                add({"L": length, "batch": b, "method": "top-K only", "top_k": how,
                     "ms": round(ms, 3)})  # fmt: skip
            del keys, methods
    return rows


def table(rows) -> str:
    head = f"{'L':>7} {'batch':>5} {'method':36} {'top-K':>6} {'ms':>9} {'x exact':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        how = r.get("top_k", "top_k")
        ref = next(x["ms"] for x in rows if (x["L"], x["batch"], x["method"],
                   x.get("top_k", "top_k")) == (r["L"], r["batch"], "exact", "top_k"))  # fmt: skip
        lines.append(f"{r['L']:>7} {r['batch']:>5} {r['method']:36} {how:>6} {r['ms']:>9.3f} "
                     f"{ref / r['ms']:>8.2f}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    backend = keras.backend.backend()
    devices = [str(d) for d in keras.distribution.list_devices()] if backend == "jax" else []
    rows = run(args.lengths, args.batch, args.top_k, args.repeats)
    text = table(rows)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    report = {
        "benchmark": "pq_search_time", "backend": backend, "devices": devices,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d"), "top_k": args.top_k, "rows": rows,
    }  # fmt: skip
    base = os.path.join(args.out, f"pq_search_time_{backend}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
