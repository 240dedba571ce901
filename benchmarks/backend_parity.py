"""Validation AUC of `seminar train`'s defaults on one preprocessing output, over several
seeds, on whichever Keras backend runs it: the check that the JAX path (numpy reader, the
GPU machine) reaches the TensorFlow path's validation AUC (tf.data, the CPU).

    python benchmarks/backend_parity.py --data OUT_OF_SEMINAR_PREPROCESS --seeds 0 1 2 \
        --epochs 1 --out DIR       # writes DIR/backend_parity_<backend>.json and .txt

Each seed's row: best validation AUC, the epochs run, seconds and examples/s of the first
epoch (which includes XLA compilation under JAX). The summary gives the mean and a 95%
t-interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402

from seminar_tf import training  # noqa: E402

# Two-sided 95% Student t quantiles by degrees of freedom (seeds - 1).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval (0 for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    t = _T95.get(len(values) - 1, 1.96)
    return mean, t * statistics.stdev(values) / len(values) ** 0.5


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="a `seminar preprocess` output")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    backend = keras.backend.backend()
    reader = "numpy" if backend != "tensorflow" else "tf.data"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            cfg = training.TrainConfig(epochs=args.epochs, seed=seed, reader=reader)
            t = time.time()
            _, hist = training.train(args.data, os.path.join(tmp, f"s{seed}"), cfg)
            rows.append({
                "seed": seed, "best_val_auc": round(max(hist["val_auc"]), 4),
                "epochs_run": len(hist["val_auc"]), "seconds": round(time.time() - t, 1),
                "examples_per_sec_by_epoch": [round(v, 1) for v in hist["examples_per_sec"]],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    mean, half = interval([r["best_val_auc"] for r in rows])
    devices = [str(d) for d in keras.distribution.list_devices()] if backend == "jax" else []
    report = {
        "backend": backend, "reader": reader, "devices": devices, "epochs": args.epochs,
        "data": os.path.abspath(args.data), "date": time.strftime("%Y-%m-%d"),
        "runs": rows, "val_auc_mean": round(mean, 4), "val_auc_ci95": round(half, 4),
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"backend_parity_{backend}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
    line = f"backend={backend} reader={reader} seeds={len(rows)} epochs={args.epochs} " \
           f"val_auc={mean:.4f} +/- {half:.4f} (95% t)"  # fmt: skip
    with open(base + ".txt", "w") as f:
        f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
