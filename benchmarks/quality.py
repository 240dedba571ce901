"""Model quality: SEMINAR (pretrained and from scratch) against its baselines.

Two data sets, each through the real commands' code paths (preprocess -> [pretrain] -> train
-> evaluate on test, models selected on validation AUC only):

- synthetic lifelong data (``seminar data synth``), where the planted signal needs the whole
  history;
- MovieLens latest-small (``../shared/data/movielens-small``) under the LongCTR protocol:
  rating >= 4 is a click, a global 80/10/10 split by time, a history of up to 100 earlier
  clicks.

    python benchmarks/quality.py [--datasets synthetic movielens] [--seeds 0] [--epochs 3]
                                 [--tune-trials N]

With ``--tune-trials N`` every model first gets the same search (``seminar_tf.tuning``: N
runs scored on validation, seeded by the first seed), and its final runs use the best values.

Prints a table and writes ``quality.json`` and ``quality.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("SEMINAR_QUIET", "1")

from preprocessing.pipeline import PreprocessConfig, run  # noqa: E402
from seminar_tf import training, tuning  # noqa: E402
from seminar_tf.data import movielens, synth  # noqa: E402
from seminar_tf.data.readers import write_tables  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from seeds import LONGCTR, ci95  # noqa: E402

MODELS = {
    "dnn (no history)": {"preset": "dnn"},
    "din (last 50)": {"preset": "din", "top_k": 50},
    "sim (soft search)": {"preset": "sim", "top_k": 50},
    "eta (simhash)": {"preset": "eta", "top_k": 50},
    "twin": {"preset": "twin", "top_k": 50},
    "seminar, scratch": {"preset": "seminar", "top_k": 50},
    "seminar, pretrained": {"preset": "seminar", "top_k": 50, "_pretrain": True},
    "seminar, pretrained, own GSU": {
        "preset": "seminar",
        "top_k": 50,
        "_pretrain": True,
        "_restore_attention": False,
    },
    "seminar, pretrained 3 ep": {"preset": "seminar", "top_k": 50, "_pretrain": 3},
    "seminar, pretrained, frozen": {
        "preset": "seminar",
        "top_k": 50,
        "_pretrain": True,
        "freeze_pretrained": True,
    },
}


def prepare(name: str, tmp: str, max_len: int) -> str:
    out = os.path.join(tmp, name)
    raw = os.path.join(tmp, name + "_raw")
    if name == "synthetic":
        tables = synth.generate(synth.SynthConfig(num_users=300, seed=0))
    else:
        tables, _ = movielens.load(
            os.environ.get("SEMINAR_MOVIELENS", "../shared/data/movielens-small")
        )
    paths = write_tables(tables, raw)
    run(
        PreprocessConfig(
            events=[paths["events"]], items=[paths["items"]],
            queries=[paths["queries"]] if "queries" in paths else [],
            out_dir=out, max_len=max_len,
        )
    )  # fmt: skip
    return out


def one_run(
    data_dir,
    tmp,
    label,
    model_cfg,
    seed,
    epochs,
    max_ranked,
    history="positive",
    patience=1,
    learning_rate=1e-3,
    params=None,
):
    model_cfg = dict(model_cfg)
    pretrain = model_cfg.pop("_pretrain", False)
    restore_attention = model_cfg.pop("_restore_attention", True)
    run_dir = os.path.join(tmp, f"{os.path.basename(data_dir)}_{label}_{seed}".replace(" ", "_"))
    t0 = time.time()
    pretrained = None
    if pretrain:
        pretrained = _pretrain(data_dir, run_dir + "_psu", pretrain, seed, history)
    cfg = training.TrainConfig(
        epochs=epochs, seed=seed, patience=patience, model=model_cfg, history=history,
        learning_rate=learning_rate, restore_attention=restore_attention,
    )  # fmt: skip
    if params:  # tuned on validation (tune_model)
        cfg = tuning.apply_params(cfg, params)
    _, history = training.train(data_dir, run_dir, cfg, pretrained=pretrained)
    report = training.evaluate(data_dir, run_dir, max_ranked=max_ranked, seed=seed)
    report["best_val_auc"] = max(history.get("val_auc", [float("nan")]))
    report["epochs_run"] = len(history["loss"])
    report["train_examples_per_sec"] = statistics.median(history["examples_per_sec"])
    report["seconds"] = round(time.time() - t0, 1)
    report["tuned_params"] = params
    return report


def _pretrain(data_dir, out, epochs, seed, history) -> str:
    pcfg = training.TrainConfig(
        epochs=int(epochs), seed=seed, history=history, model={"num_heads": 4}
    )
    training.pretrain(data_dir, out, pcfg)
    return out


def tune_model(data_dir, tmp, label, model_cfg, seed, epochs, trials, history, patience):
    """The best values of ``tuning.SEARCH_SPACE`` for one model: ``trials`` runs scored on
    the validation split (a pretrained model's from a PSU pretrained with ``seed``)."""
    model_cfg = dict(model_cfg)
    pretrain = model_cfg.pop("_pretrain", False)
    restore_attention = model_cfg.pop("_restore_attention", True)
    out = os.path.join(tmp, f"tune_{os.path.basename(data_dir)}_{label}".replace(" ", "_"))
    pretrained = _pretrain(data_dir, out + "_psu", pretrain, seed, history) if pretrain else None
    base = training.TrainConfig(
        epochs=epochs, seed=seed, patience=patience, model=model_cfg, history=history,
        restore_attention=restore_attention,
    )  # fmt: skip
    return tuning.tune(data_dir, out, base, trials, pretrained=pretrained)["best_params"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["synthetic", "movielens"])
    parser.add_argument("--models", nargs="+", default=list(MODELS)[:7], choices=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=100)
    parser.add_argument("--history", choices=("positive", "all"), default="positive",
                        help="positive: earlier clicks (the peers' protocol); all: every "
                        "earlier event with its label")  # fmt: skip
    parser.add_argument("--patience", type=int, default=1, help="early-stopping patience")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-ranked", type=int, default=3000)
    parser.add_argument("--tune-trials", type=int, default=0,
                        help="N > 0: tune every model with N runs on validation first "
                        "(seminar tune's space; the same budget for each)")  # fmt: skip
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="quality", help="output file stem")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "absl"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets:
            data_dir = prepare(ds, tmp, args.max_len)
            for label in args.models:
                params = None
                if args.tune_trials > 0:
                    params = tune_model(data_dir, tmp, label, MODELS[label], args.seeds[0],
                                        args.epochs, args.tune_trials, args.history,
                                        args.patience)  # fmt: skip
                    print(f"{ds:<10} {label:<22} tuned on validation ({args.tune_trials} "
                          f"trials): {params}", file=sys.stderr, flush=True)  # fmt: skip
                for seed in args.seeds:
                    rep = one_run(data_dir, tmp, label, MODELS[label], seed, args.epochs,
                                  args.max_ranked, args.history, args.patience,
                                  args.learning_rate, params)  # fmt: skip
                    rep.update({"dataset": ds, "model": label, "seed": seed})
                    results.append(rep)
                    print(f"{ds:<10} {label:<22} seed {seed}: test AUC {rep['auc']:.4f} "
                          f"GAUC {rep['gauc']:.4f} NDCG@10 {rep['ndcg@10']:.4f} "
                          f"(val {rep['best_val_auc']:.4f}, {rep['seconds']:.0f}s)",
                          file=sys.stderr, flush=True)  # fmt: skip
    summary = summarise(results)
    report = {
        "benchmark": "quality",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "settings": {
            "epochs": args.epochs,
            "max_len": args.max_len,
            "history": args.history,
            "patience": args.patience,
            "learning_rate": args.learning_rate,
            "tune_trials": args.tune_trials,
            "seeds": args.seeds,
            "batch_size": 256,
            "embedding_dim": 64,
            "ranked_positives_max": args.max_ranked,
        },  # fmt: skip
        "longctr_reference_movielens_test_auc": LONGCTR,
        "summary": summary,
        "runs": results,
    }
    print_table(summary)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    plot(summary, os.path.join(args.out, f"{args.name}.png"))


def summarise(results):
    rows = {}
    for r in results:
        rows.setdefault((r["dataset"], r["model"]), []).append(r)
    out = []
    for (ds, model), rs in rows.items():
        row = {"dataset": ds, "model": model, "seeds": len(rs)}
        for key in ("auc", "gauc", "logloss", "ndcg@10", "hr@10", "best_val_auc",
                    "train_examples_per_sec"):  # fmt: skip
            vals = [r[key] for r in rs]
            row[key] = statistics.mean(vals)
            row[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            row[key + "_ci95"] = ci95(vals)
        out.append(row)
    return out


def print_table(summary):
    header = f"{'dataset':<10} {'model':<22} {'AUC':>7} {'GAUC':>7} {'logloss':>8} {'NDCG@10':>8} {'HR@10':>7} {'val AUC':>8}"
    print(header)
    print("-" * len(header))
    for r in summary:
        print(f"{r['dataset']:<10} {r['model']:<22} {r['auc']:>7.4f} {r['gauc']:>7.4f} "
              f"{r['logloss']:>8.4f} {r['ndcg@10']:>8.4f} {r['hr@10']:>7.4f} "
              f"{r['best_val_auc']:>8.4f}  (AUC +-{r['auc_ci95']:.4f}, {r['seeds']} seeds)")  # fmt: skip


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in summary})
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        rows = [r for r in summary if r["dataset"] == ds]
        ax.barh([r["model"] for r in rows], [r["auc"] for r in rows],
                xerr=[r["auc_ci95"] for r in rows], color="#4c72b0")  # fmt: skip
        lo = min(r["auc"] for r in rows) - 0.03
        ax.set_xlim(max(0.4, lo), max(r["auc"] for r in rows) + 0.02)
        if ds == "movielens":
            ax.axvline(LONGCTR["DIN"], color="red", ls="--", lw=1, label="LongCTR DIN 0.693")
            ax.axvline(0.70, color="green", ls=":", lw=1, label="target 0.70")
            ax.legend(fontsize=7, loc="lower right")
        ax.set_title(f"{ds}: test AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
