"""How much of the exact first stage the product-quantized one keeps, and what it costs in AUC.

For each data set: preprocess -> train a SEMINAR model (exact GSU, top-K 50) -> for a grid of
codebook shapes (sub-vectors S per modality x centroids C per codebook) fit the codebooks by
k-means on training histories (``seminar_tf.quantization.quantize_model``) and measure on the
validation split, against the exact GSU scores of the same model:

- ``recall k@50``: the share of the exact top-k behaviours that the quantized top-50 keeps,
  over the examples with more than 50 real behaviours (with fewer, any scorer keeps them all);
- the same for symmetric quantization (the target quantized too, as the public recall script
  does) at each grid point, to show what asymmetric scoring buys;
- test AUC / logloss of the exact and quantized models (the full cascade, ``seminar
  evaluate``'s CTR metrics).

    python benchmarks/pq_recall.py [--datasets movielens synthetic] [--epochs 1]

Prints a table; writes ``pq_recall.json`` and ``pq_recall.png`` (recall curves) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("SEMINAR_QUIET", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.quality import prepare  # noqa: E402
from benchmarks.serving import machine, write_results  # noqa: E402
from seminar_tf import evaluation, training  # noqa: E402

TOP_K = 50
KS = (10, 50)
GRID = [(16, 16), (16, 64), (16, 256), (16, 512), (8, 256), (32, 256)]  # (S, C)


def _np(x):
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def batch_scores(exact, pq_model, features) -> dict:
    """Exact, asymmetric-PQ and symmetric-PQ GSU scores ``[B, L]`` and the mask."""
    from keras import ops

    emb = exact.pair_embedding
    t_vec, t_mask = emb.encode(
        features["target_item"], features["target_query"], features["target_query_tokens"]
    )
    target = exact._gsu_target(t_vec, t_mask, emb.fuse(t_vec, t_mask))
    parts, masks = exact.gsu_parts(features)
    weights = emb.fusion_weights(masks)
    keys = emb.fuse(parts, masks)
    mask = _np(features["hist_item"]) != 0
    scorer = pq_model.gsu.scorer
    codes = scorer.encode_codes(parts, masks)
    stacked = scorer.stack_weights(weights)
    # Symmetric: the target's own modality vectors replaced by their centroids.
    t_parts = exact._project_gsu(t_vec)
    t_codes = _np(scorer.encode_codes(t_parts, t_mask))
    books = _np(scorer.codebooks)
    rebuilt = {}
    for i, m in enumerate(scorer.modalities):
        if m not in t_parts:
            continue
        sub = books[i][np.arange(books.shape[1])[None, :], np.maximum(t_codes[:, i], 0)]
        rebuilt[m] = ops.convert_to_tensor(sub.reshape(len(sub), -1) * (t_codes[:, i, :1] >= 0))
    sym_target = emb.fuse(rebuilt, t_mask)
    return {
        "exact": _np(exact.gsu.scorer(target, keys, mask)),
        "asymmetric": _np(scorer.score_codes(target, codes, stacked)),
        "symmetric": _np(scorer.score_codes(sym_target, codes, stacked)),
        "mask": mask,
    }


def recall_counts(scores: dict, ks=KS, top_k=TOP_K) -> dict:
    """Per method, ``[sum of recall k@top_k, examples]`` over rows with > top_k behaviours."""
    mask = scores["mask"]
    rows = np.flatnonzero(mask.sum(1) > top_k)
    out = {}

    def top(values, n):
        ranked = np.where(mask, values, -np.inf)
        return np.argsort(-ranked, axis=1, kind="stable")[:, :n]

    ref = top(scores["exact"], max(ks))
    for method in ("asymmetric", "symmetric"):
        got = top(scores[method], top_k)
        sums = {k: 0.0 for k in ks}
        for r in rows:
            kept = set(got[r].tolist())
            for k in ks:
                sums[k] += len(kept.intersection(ref[r, :k].tolist())) / k
        out[method] = {k: sums[k] for k in ks}
    out["examples"] = len(rows)
    return out


def run_dataset(name: str, tmp: str, args) -> dict:
    from seminar_tf.data.dataset import make_dataset
    from seminar_tf.quantization import quantize_model

    t0 = time.time()
    data_dir = prepare(name, tmp, args.max_len)
    print(f"[{name}] preprocessed in {time.time() - t0:.0f}s", flush=True)
    model_dir = os.path.join(tmp, f"{name}_exact")
    cfg = training.TrainConfig(
        epochs=args.epochs, batch_size=256, seed=0, model={"preset": "seminar", "top_k": TOP_K}
    )
    t1 = time.time()
    training.train(data_dir, model_dir, cfg)
    print(f"[{name}] trained in {time.time() - t1:.0f}s", flush=True)
    exact = training.load_model(model_dir)
    sample = make_dataset(data_dir, "train", 256, trim=True).take(40).map(lambda f, y: f)
    valid = [f for f, _ in make_dataset(data_dir, "valid", 256, trim=True).take(args.batches)]

    def auc_of(model):
        def predict(features):
            return np.asarray(model.predict_on_batch(features)).reshape(-1)

        test = make_dataset(data_dir, "test", 512, include_meta=True, trim=True)
        report = evaluation.evaluate_ctr(predict, test)
        return {k: report[k] for k in ("auc", "gauc", "logloss", "examples")}

    rows = [{"S": None, "C": None, "method": "exact", **auc_of(exact)}]
    print(f"[{name}] exact: test AUC {rows[0]['auc']:.4f}", flush=True)
    for s, c in GRID:
        t2 = time.time()
        pq_model, fit = quantize_model(exact, sample, s, c, max_vectors=args.max_vectors)
        fit_s = time.time() - t2
        totals = None
        for features in valid:
            counts = recall_counts(batch_scores(exact, pq_model, features))
            if totals is None:
                totals = counts
                continue
            totals["examples"] += counts["examples"]
            for method in ("asymmetric", "symmetric"):
                for k in KS:
                    totals[method][k] += counts[method][k]
        n = max(totals["examples"], 1)
        errors = {m: r["relative_error"] for m, r in fit.items() if r["vectors"]}
        row = {
            "S": s, "C": c, "method": "pq", "fit_seconds": round(fit_s, 1),
            "recall_examples": totals["examples"],
            **{f"recall@{k}": totals["asymmetric"][k] / n for k in KS},
            **{f"symmetric_recall@{k}": totals["symmetric"][k] / n for k in KS},
            "relative_error": errors,
            "bytes_per_behaviour": len(pq_model.gsu.scorer.modalities) * s * (1 if c <= 256 else 2),
        }  # fmt: skip
        if (s, c) == (16, 512) or args.auc_all:
            row.update(auc_of(pq_model))
        rows.append(row)
        print(f"[{name}] S={s} C={c}: recall@10 {row['recall@10']:.3f} recall@50 "
              f"{row['recall@50']:.3f} (symmetric {row['symmetric_recall@10']:.3f} / "
              f"{row['symmetric_recall@50']:.3f})"
              + (f" test AUC {row['auc']:.4f}" if "auc" in row else ""),
              flush=True)  # fmt: skip
    return {"dataset": name, "max_len": args.max_len, "epochs": args.epochs, "rows": rows}


def table(results: list) -> str:
    head = (f"{'dataset':10} {'S':>3} {'C':>4} {'B/beh':>5} {'rec@10':>7} {'rec@50':>7} "
            f"{'sym@10':>7} {'sym@50':>7} {'n':>6} {'test AUC':>8} {'logloss':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for res in results:
        for r in res["rows"]:
            auc = f"{r['auc']:.4f}" if "auc" in r else "-"
            loss = f"{r['logloss']:.4f}" if "logloss" in r else "-"
            if r["method"] == "exact":
                lines.append(f"{res['dataset']:10} {'exact':>8} {'':>5} {'1.000':>7} {'1.000':>7} "
                             f"{'':>7} {'':>7} {'':>6} {auc:>8} {loss:>8}")  # fmt: skip
                continue
            lines.append(
                f"{res['dataset']:10} {r['S']:>3} {r['C']:>4} {r['bytes_per_behaviour']:>5} "
                f"{r['recall@10']:>7.3f} {r['recall@50']:>7.3f} {r['symmetric_recall@10']:>7.3f} "
                f"{r['symmetric_recall@50']:>7.3f} {r['recall_examples']:>6} {auc:>8} {loss:>8}"
            )
    return "\n".join(lines)


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = [r for r in res["rows"] if r["method"] == "pq" and r["S"] == 16]
        rows.sort(key=lambda r: r["C"])
        xs = [r["C"] for r in rows]
        for k, color in zip(KS, ("tab:blue", "tab:orange")):
            ax.plot(xs, [r[f"recall@{k}"] for r in rows], "-o", color=color,
                    label=f"asymmetric recall {k}@{TOP_K}")  # fmt: skip
            ax.plot(xs, [r[f"symmetric_recall@{k}"] for r in rows], "--s", color=color,
                    alpha=0.6, label=f"symmetric recall {k}@{TOP_K}")  # fmt: skip
        for r in res["rows"]:
            if r["method"] == "pq" and r["S"] != 16:
                ax.scatter([r["C"]], [r[f"recall@{TOP_K}"]], marker="x", color="tab:green")
                ax.annotate(f" S={r['S']}", (r["C"], r[f"recall@{TOP_K}"]), fontsize=7,
                            color="tab:green")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_ylim(0.8, 1.005)
        ax.set_xlabel("centroids per codebook C (S = 16 sub-vectors per modality)")
        ax.set_ylabel("share of the exact top-k kept")
        ax.set_title(f"{res['dataset']} (L <= {res['max_len']}, validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("SEMINAR first stage: product-quantized vs exact top-50")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["movielens", "synthetic"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=1000)
    parser.add_argument("--batches", type=int, default=8, help="validation batches of 256")
    parser.add_argument("--max-vectors", type=int, default=100_000)
    parser.add_argument("--auc-all", action="store_true", help="test AUC at every grid point")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--replot", action="store_true", help="redraw OUT/pq_recall.png only")
    args = parser.parse_args(argv)
    if args.replot:
        with open(os.path.join(args.out, "pq_recall.json")) as f:
            plot(json.load(f)["results"], os.path.join(args.out, "pq_recall.png"))
        return 0
    info = machine()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            results.append(run_dataset(name, tmp, args))
    text = table(results)
    print(text)
    info["load_average_at_end"] = list(os.getloadavg())
    report = {"benchmark": "pq_recall", "machine": info, "top_k": TOP_K, "grid": GRID,
              "results": results}  # fmt: skip
    write_results(args.out, "pq_recall", report, text)
    plot(results, os.path.join(args.out, "pq_recall.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
