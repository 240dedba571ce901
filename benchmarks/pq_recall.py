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
from seminar_tf.train_config import PQ_DEFAULTS  # noqa: E402

TOP_K = 50
KS = (10, 50)
GRID = [(16, 256), (16, 512)]  # (S, C), per modality (16 x 512: SEMINAR's and the old default)
# What is coded (issue: quantize what is scored), each (layout, OPQ rotation, S, C).
# What is coded (issue: quantize what is scored), each (layout, transform, S, C); transform
# "" (none), "opq" (OPQ rotation), "score" (score-aware), "score+opq" (both).
LAYOUT_GRID = [
    ("fused", "", 8, 256), ("fused", "", 16, 256), ("fused", "", 32, 256),
    ("fused", "", 64, 256),
    ("fused", "opq", 8, 256), ("fused", "opq", 16, 256), ("fused", "opq", 32, 256),
    ("fused", "score", 8, 256), ("fused", "score", 16, 256), ("fused", "score", 32, 256),
    ("fused", "score+opq", 8, 256), ("fused", "score+opq", 16, 256),
    ("fused", "score+opq", 32, 256), ("fused", "score+opq", 64, 256),
    ("sides", "score+opq", 8, 256), ("sides", "score+opq", 16, 256),
    ("sides", "score+opq", 32, 256),
]  # fmt: skip
# seminar quantize's default (PQ_DEFAULTS), its test AUC measured with its shortlist
DEFAULT_AT = ("fused", "score+opq", PQ_DEFAULTS["num_subvectors"], PQ_DEFAULTS["num_centroids"])
SHORTLISTS = (2, 4)  # shortlists of x * K re-ranked exactly
FAISS_GRID = [("pq", 8), ("pq", 16), ("pq", 32), ("pq", 64), ("opq", 8), ("opq", 16), ("opq", 32),
              ("rq", 8), ("rq", 16), ("rq", 32)]  # fmt: skip


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
    codes = pq_model.pq_codes(features)
    stacked = scorer.stack_weights(weights)
    # Symmetric: the target's own coded vectors replaced by their centroids.
    t_vectors, t_totals = scorer.group_vectors(
        exact._project_gsu(t_vec), emb.fusion_weights(t_mask)
    )
    t_codes = _np(scorer.encode_codes(t_vectors, {g: w > 0 for g, w in t_totals.items()}))
    books, rotations = _np(scorer.codebooks), _np(scorer.rotations)
    sym_target = 0.0
    for i, g in enumerate(scorer.group_names):
        if g not in t_vectors:
            continue
        sub = books[i][np.arange(books.shape[1])[None, :], np.maximum(t_codes[:, i], 0)]
        rebuilt = sub.reshape(len(sub), -1) @ np.linalg.inv(rotations[i]) * (t_codes[:, i, :1] >= 0)
        sym_target = sym_target + rebuilt * _np(t_totals[g])[:, None]
    return {
        "exact": _np(exact.gsu.scorer(target, keys, mask)),
        "asymmetric": _np(scorer.score_codes(target, codes, stacked)),
        "symmetric": _np(scorer.score_codes(ops.convert_to_tensor(sym_target), codes, stacked)),
        "mask": mask,
    }


def fused_keys(exact, features):
    """``(target [B, d], keys [B, L, d], mask [B, L])``: what the exact GSU scores."""
    emb = exact.pair_embedding
    t_vec, t_mask = emb.encode(
        features["target_item"], features["target_query"], features["target_query_tokens"]
    )
    target = exact._gsu_target(t_vec, t_mask, emb.fuse(t_vec, t_mask))
    parts, masks = exact.gsu_parts(features)
    return target, _np(emb.fuse(parts, masks)), _np(features["hist_item"]) != 0


def faiss_codec(kind: str, m: int, sample: np.ndarray):
    """A FAISS PQ (or OPQ + PQ, or residual quantizer) of ``m`` bytes, 8 bits a code,
    trained on ``sample`` (the residual quantizer on 50,000 of it: its beam search is slow)."""
    import faiss

    d = sample.shape[1]
    factory = {"pq": f"PQ{m}x8", "opq": f"OPQ{m},PQ{m}x8", "rq": f"RQ{m}x8"}[kind]
    index = faiss.index_factory(d, factory)
    index.train(np.ascontiguousarray(sample[:50_000] if kind == "rq" else sample, np.float32))
    return index


def faiss_scores(exact, index, features) -> dict:
    """Exact scores against the GSU keys, and the same scorer on the FAISS reconstruction."""
    target, keys, mask = fused_keys(exact, features)
    flat = np.ascontiguousarray(keys.reshape(-1, keys.shape[-1]), np.float32)
    rebuilt = index.sa_decode(index.sa_encode(flat)).reshape(keys.shape)
    return {
        "exact": _np(exact.gsu.scorer(target, keys, mask)),
        "asymmetric": _np(exact.gsu.scorer(target, rebuilt, mask)),
        "symmetric": _np(exact.gsu.scorer(target, rebuilt, mask)),
        "mask": mask,
    }


SCANN_GRID = (8, 16, 32)  # bytes: 8-bit AH codes (lut256) of 64 / bytes dimensions each


def scann_rows(exact, keys, valid, recall_of, tmp) -> list:
    """ScaNN AH (anisotropic, 8-bit codes) on the same keys: ``benchmarks/scann_codes.py``
    in its own process (see there); no rows, with a line saying why, where ScaNN is absent.
    """
    import subprocess

    encode = np.unique(np.concatenate([k[m] for _, k, m in (fused_keys(exact, f) for f in valid)]),
                       axis=0)  # fmt: skip
    path_in, path_out = os.path.join(tmp, "scann_in.npz"), os.path.join(tmp, "scann_out.npz")
    np.savez(path_in, train=keys[:50_000], encode=encode)
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scann_codes.py")
    lookup = {row.tobytes(): i for i, row in enumerate(encode)}
    rows = []
    for size in SCANN_GRID:
        d = keys.shape[1]
        t = time.time()
        done = subprocess.run(
            [sys.executable, script, path_in, path_out, "--dims-per-block", str(d // size),
             "--hash", "lut256"], capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            print(f"ScaNN rows skipped: {done.stderr.strip().splitlines()[-1:]}", flush=True)
            return rows
        rebuilt = np.load(path_out)["rebuilt"]

        def score(features, rebuilt=rebuilt):
            target, k, mask = fused_keys(exact, features)
            flat = k.reshape(-1, k.shape[-1])
            index = np.array([lookup.get(r.tobytes(), -1) for r in flat])
            approx = np.where((index >= 0)[:, None], rebuilt[np.maximum(index, 0)], flat)
            approx = approx.reshape(k.shape)
            return {"exact": _np(exact.gsu.scorer(target, k, mask)),
                    "asymmetric": _np(exact.gsu.scorer(target, approx, mask)),
                    "symmetric": _np(exact.gsu.scorer(target, approx, mask)), "mask": mask}  # fmt: skip

        rows.append({"S": size, "C": 256, "method": "scann-ah", "layout": "fused",
                     "transform": "", "fit_seconds": round(time.time() - t, 1),
                     **recall_of(score), "bytes_per_behaviour": size,
                     "code_bytes_per_behaviour": size,
                     "encoded_share_of_training_db": round(len(encode) / (len(encode) + min(
                         len(keys), 50_000)), 4)})  # fmt: skip
    return rows


def recall_counts(scores: dict, ks=KS, top_k=TOP_K) -> dict:
    """Per method, ``[sum of recall k@top_k, examples]`` over rows with > top_k behaviours."""
    mask = scores["mask"]
    rows = np.flatnonzero(mask.sum(1) > top_k)
    out = {}

    def top(values, n):
        ranked = np.where(mask, values, -np.inf)
        return np.argsort(-ranked, axis=1, kind="stable")[:, :n]

    ref = top(scores["exact"], max(ks))
    for method in ("asymmetric", "symmetric") + tuple(f"shortlist{x}" for x in SHORTLISTS):
        if method.startswith("shortlist"):
            # The quantized top (x * K), re-ranked by the exact score: what a re-rank of a
            # shortlist from item vectors looked up by id keeps.
            short = top(scores["asymmetric"], int(method[len("shortlist") :]) * top_k)
            exact = np.take_along_axis(np.where(mask, scores["exact"], -np.inf), short, axis=1)
            got = np.take_along_axis(short, np.argsort(-exact, axis=1, kind="stable"), axis=1)
            got = got[:, :top_k]
        else:
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
    data_dir = args.data or prepare(name, tmp, args.max_len)
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

    def recall_of(score_batch) -> dict:
        totals = None
        for features in valid:
            counts = recall_counts(score_batch(features))
            if totals is None:
                totals = counts
                continue
            totals["examples"] += counts["examples"]
            for method in counts:
                if method != "examples":
                    for k in KS:
                        totals[method][k] += counts[method][k]
        n = max(totals["examples"], 1)
        return {
            "recall_examples": totals["examples"],
            **{f"recall@{k}": totals["asymmetric"][k] / n for k in KS},
            **{f"symmetric_recall@{k}": totals["symmetric"][k] / n for k in KS},
            **{f"shortlist{x}_recall@{TOP_K}": totals[f"shortlist{x}"][TOP_K] / n
               for x in SHORTLISTS},
        }  # fmt: skip

    def report(row):
        rows.append(row)
        print(f"[{name}] {row['method']} {row.get('layout', '')} {row.get('transform') or ''} "
              f"S={row['S']} C={row['C']} ({row['bytes_per_behaviour']} B): recall@10 "
              f"{row['recall@10']:.3f} recall@50 {row['recall@50']:.3f}"
              + (f" test AUC {row['auc']:.4f}" if "auc" in row else ""), flush=True)  # fmt: skip

    grid = [("modality", "", s_, c_) for s_, c_ in GRID] if "modality" in args.parts else []
    grid += LAYOUT_GRID if "layouts" in args.parts else []
    grid += [DEFAULT_AT, ("fused", "", 32, 256)] if "default" in args.parts else []
    for layout, transform, s, c in grid:
        rotation, score_aware = "opq" in transform, "score" in transform
        # The default re-ranks a shortlist: its test AUC is measured with it (the recall
        # columns are the codes' alone, and the shortlist columns what re-ranks keep).
        default = (layout, transform, s, c) == DEFAULT_AT
        shortlist = PQ_DEFAULTS["shortlist"] if default else 1
        t2 = time.time()
        pq_model, fit = quantize_model(exact, sample, s, c, max_vectors=args.max_vectors,
                                       layout=layout, rotation=rotation,
                                       score_aware=score_aware, shortlist=shortlist)  # fmt: skip
        fit_s = time.time() - t2
        scorer = pq_model.gsu.scorer
        row = {
            "S": s, "C": c, "method": "pq", "layout": layout, "rotation": rotation,
            "score_aware": score_aware, "transform": transform, "shortlist": shortlist,
            "default": default, "fit_seconds": round(fit_s, 1),
            **recall_of(lambda f, m=pq_model: batch_scores(exact, m, f)),
            "relative_error": {m: r["relative_error"] for m, r in fit.items() if r["vectors"]},
            # With per-item / per-query code tables ("sides") a stored behaviour is two ids.
            "bytes_per_behaviour": 8 if layout == "sides" else scorer.code_bytes,
            "code_bytes_per_behaviour": scorer.code_bytes,
        }  # fmt: skip
        if layout == "sides":
            row["table_bytes_per_item_and_query"] = scorer.code_bytes // len(scorer.groups)
        if (layout, transform, s, c) in args.auc_at or args.auc_all:
            row.update(auc_of(pq_model))
        report(row)
    if "faiss" in args.parts or "scann" in args.parts:
        keys = []
        for features in sample:
            _, k, m = fused_keys(exact, features)
            keys.append(k[m])
        keys = np.concatenate(keys)
        rng = np.random.default_rng(0)
        if len(keys) > args.max_vectors:
            keys = keys[rng.choice(len(keys), args.max_vectors, replace=False)]
        for kind, m in FAISS_GRID if "faiss" in args.parts else ():
            t2 = time.time()
            index = faiss_codec(kind, m, keys)
            row = {"S": m, "C": 256, "method": f"faiss-{kind}", "layout": "fused",
                   "rotation": kind == "opq", "transform": "opq" if kind == "opq" else "", "fit_seconds": round(time.time() - t2, 1),
                   **recall_of(lambda f, i=index: faiss_scores(exact, i, f)),
                   "bytes_per_behaviour": m, "code_bytes_per_behaviour": m}  # fmt: skip
            report(row)
    if "scann" in args.parts:
        for row in scann_rows(exact, keys, valid, recall_of, tmp):
            report(row)
    return {"dataset": name, "max_len": args.max_len, "epochs": args.epochs, "rows": rows}


def table(results: list) -> str:
    head = (f"{'dataset':10} {'method':9} {'layout':8} {'transform':>9} {'S':>3} {'C':>4} {'B/beh':>5} "
            f"{'rec@10':>7} {'rec@50':>7} {'sym@10':>7} {'sym@50':>7} {'4K>50':>6} {'n':>6} "
            f"{'test AUC':>8}")  # fmt: skip
    lines = [head, "-" * len(head)]
    for res in results:
        for r in res["rows"]:
            auc = f"{r['auc']:.4f}" if "auc" in r else "-"
            if r["method"] == "exact":
                lines.append(f"{res['dataset']:10} {'exact':9} {'':8} {'':>9} {'':>3} {'':>4} "
                             f"{'':>5} {'1.000':>7} {'1.000':>7} {'':>7} {'':>7} {'':>6} {'':>6} "
                             f"{auc:>8}")  # fmt: skip
                continue
            sym = r["method"] == "pq"
            lines.append(
                f"{res['dataset']:10} {r['method']:9} {r.get('layout', 'modality'):8} "
                f"{_transform(r) or '-':>9} {r['S']:>3} {r['C']:>4} "
                f"{r['bytes_per_behaviour']:>5} {r['recall@10']:>7.3f} {r['recall@50']:>7.3f} "
                f"{r['symmetric_recall@10'] if sym else float('nan'):>7.3f} "
                f"{r['symmetric_recall@50'] if sym else float('nan'):>7.3f} "
                f"{r.get(f'shortlist4_recall@{TOP_K}', float('nan')):>6.3f} "
                f"{r['recall_examples']:>6} {auc:>8}"
            )
    return "\n".join(lines)


def _family(r) -> str:
    if r["method"] == "scann-ah":
        return "ScaNN AH"
    if r["method"] != "pq":
        return r["method"].replace("faiss-", "FAISS ").upper().replace("FAISS ", "FAISS ")
    label = {"modality": "per modality", "sides": "item/query sides", "fused": "fused key"}
    names = {"opq": " + OPQ", "score": " + score-aware", "score+opq": " + score-aware + OPQ"}
    return label[r.get("layout", "modality")] + names.get(_transform(r), "")


def _transform(r) -> str:
    """A row's transform; rows written before the score-aware transform have "rotation"."""
    return r.get("transform", "opq" if r.get("rotation") else "")


def plot(results: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        families: dict = {}
        for r in res["rows"]:
            if r["method"] == "exact" or (r["method"] == "pq" and r["C"] < 256):
                continue
            families.setdefault(_family(r), []).append(r)
        for label, rows in sorted(families.items()):
            rows.sort(key=lambda r: r.get("code_bytes_per_behaviour", r["bytes_per_behaviour"]))
            xs = [r.get("code_bytes_per_behaviour", r["bytes_per_behaviour"]) for r in rows]
            style = "--s" if label.startswith("FAISS") else "-o"
            ax.plot(xs, [r[f"recall@{TOP_K}"] for r in rows], style, label=label, alpha=0.85)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0.8, 1.002)
        ax.set_xlabel("code bytes per behaviour (sides: 2 x S, or 8 B of ids with code tables)")
        ax.set_ylabel(f"recall {TOP_K}@{TOP_K} (share of the exact top-50 kept)")
        ax.set_title(f"{res['dataset']} (L <= {res['max_len']}, validation)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("SEMINAR first stage: quantized vs exact top-50, by what is coded")
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
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["modality", "layouts", "faiss", "scann"],
        choices=["modality", "layouts", "faiss", "scann", "default"],
        help="per-modality grid, the sides/fused layouts, FAISS and ScaNN (when installed: "
        "pip install scann) on the fused keys, or seminar quantize's default (and the plain "
        "fused S=32) alone",
    )
    parser.add_argument("--data", help="an existing `seminar preprocess` output (one data set)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--replot", action="store_true", help="redraw OUT/pq_recall.png only")
    args = parser.parse_args(argv)
    args.auc_at = {("modality", "", 16, 512), ("fused", "", 32, 256), DEFAULT_AT}
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
