"""First-stage search time per batch of users: the exact GSU scores against the stored codes'
lookup-table scores, each followed by the top-K, at lifelong lengths, on any Keras backend.

    python benchmarks/pq_search_time.py [--lengths 1000 10000 100000] [--batch 1 256]
        [--top-k 50] [--out benchmarks/results]

Rows (median of ``--repeats`` compiled calls after a warm-up, random inputs of the model's
sizes: d = 64, 4 heads): ``exact`` scores ``[B, L, d]`` keys (the vectors already computed:
the cheapest exact case), inputs already on the device; ``fused S=32`` and ``per modality 5 x 16, C=512`` score ``[B, L, M,
S]`` codes (SEMINAR's setting and this project's default). Writes
``pq_search_time_<backend>.{json,txt}``. Needs no TensorFlow under JAX (the GPU machine).
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


def run(lengths, batches, top_k: int, repeats: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    rows = []
    exact = ExactScorer(num_heads=4)
    exact.build((None, D), (None, None, D))
    for length in lengths:
        for b in batches:
            # Inputs made on the device: the timing is the search, not a host copy.
            target = keras.random.normal((b, D), seed=seed)
            keys = keras.random.normal((b, length, D), seed=seed + 1)
            mask = ops.ones((b, length), dtype="bool")

            def search_exact(t, k, m):
                return ops.top_k(exact(t, k, m), top_k)

            ms = timed(compiled(search_exact), (target, keys, mask), repeats)
            rows.append({"L": length, "batch": b, "method": "exact", "ms": round(ms, 3)})
            del keys
            for label, (layout, modalities, s, c) in CODINGS.items():
                scorer = PQScorer(modalities=modalities, num_subvectors=s, num_centroids=c,
                                  layout=layout, num_heads=4)  # fmt: skip
                scorer.build((None, D))
                m = len(scorer.groups)
                scorer.set_codebooks(rng.normal(size=(m, s, c, D // s)).astype("float32"))
                codes = keras.random.randint((b, length, m, s), 0, c, seed=seed + 2, dtype="int32")
                weights = ops.full((b, length, m), 1.0 / m, dtype="float32")

                def search_codes(t, k, w, scorer=scorer):
                    return ops.top_k(scorer.score_codes(t, k, w), top_k)

                ms = timed(compiled(search_codes), (target, codes, weights), repeats)
                rows.append({"L": length, "batch": b, "method": label, "ms": round(ms, 3)})
                del codes
            for r in rows[-1 - len(CODINGS) :]:
                print(json.dumps(r), flush=True)
    return rows


def table(rows) -> str:
    head = f"{'L':>7} {'batch':>5} {'method':36} {'ms':>9} {'x exact':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ref = next(x["ms"] for x in rows if (x["L"], x["batch"], x["method"]) ==
                   (r["L"], r["batch"], "exact"))  # fmt: skip
        lines.append(f"{r['L']:>7} {r['batch']:>5} {r['method']:36} {r['ms']:>9.3f} "
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
