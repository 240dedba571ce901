"""Model quality on any Keras backend, from windows materialised once as numpy arrays.

``benchmarks/quality.py`` runs the real commands' code paths (tf.data, so TensorFlow); this
script runs the same models on the same windows where TensorFlow is absent (the GPU machine
has JAX only), so many configurations x 3 seeds fit in minutes:

    # here (TensorFlow): preprocess and write the windows of every split, both history modes
    python benchmarks/quality_arrays.py dump --datasets movielens synthetic --out bench_arrays
    # anywhere (e.g. KERAS_BACKEND=jax on the GPU machine): train, select on validation, test
    python benchmarks/quality_arrays.py run --arrays bench_arrays --grid defaults \
        --seeds 0 1 2 --out results

``dump`` writes, per data set, ``<history>_<split>.npz`` (the ``spec.MODEL_FEATURES`` and the
label at the preprocessing ``max_len``, plus ``user_id`` for GAUC), ``tables.npz`` and
``schema.json``. ``run`` trains each configuration of ``--grid`` (see ``GRIDS``) with early
stopping on validation AUC (best weights kept), evaluates AUC, GAUC and logloss on the test
split, and writes ``<name>.json`` with the 95% interval of the mean over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("SEMINAR_QUIET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from seeds import LONGCTR, ci95  # noqa: E402

HISTORIES = ("all", "positive")
SPLITS = ("train", "valid", "test")

# Named configurations. Keys: model (SeminarCTR settings), history, lr, batch, epochs,
# patience, pretrain (None or PSU settings incl. "epochs", "lr", "history": the windows the
# PSU reads, default "positive"), restore_attention (default False, as `seminar train`), drop (modalities removed from the data
# for both stages: "text" and "image" of the items, "query" everywhere).
BASE = {"history": "all", "lr": 1e-3, "batch": 256, "epochs": 20, "patience": 2}
PEERS = {**BASE, "history": "positive"}


def _cfg(base, **kw):
    out = dict(base)
    model = dict(kw.pop("model", {}))
    out.update(kw)
    out["model"] = model
    return out


def _models(base):
    """The in-framework models, each with the presets' user features and short-term branch."""
    return {
        "dnn": _cfg(base, model={"preset": "dnn"}),
        "din": _cfg(base, model={"preset": "din", "top_k": 50}),
        "sim": _cfg(base, model={"preset": "sim", "top_k": 50}),
        "eta": _cfg(base, model={"preset": "eta", "top_k": 50}),
        "twin": _cfg(base, model={"preset": "twin", "top_k": 50}),
        "seminar, scratch": _cfg(base, model={"preset": "seminar", "top_k": 50}),
        "seminar, pretrained": _cfg(
            base,
            model={"preset": "seminar", "top_k": 50},
            pretrain={"epochs": 20},
            restore_attention=True,
        ),
    }


_PSU = {"preset": "seminar", "top_k": 50}
GRIDS = {
    # the defaults a user gets (history "all": clicks and non-clicks with their labels)
    "defaults": _models(BASE),
    # the peers' protocol (click-only history of up to 100 events); labels end in "(peers)"
    "peers": {f"{k} (peers)": v for k, v in _models(PEERS).items()},
    # PSU ablation under the peers' protocol: one pretraining task off at a time
    "ablation": {
        **{
            f"seminar, pretrained, no {task} (peers)": _cfg(
                PEERS,
                model=_PSU,
                pretrain={"epochs": 20, "model": {"num_heads": 4, weight: 0.0}},
                restore_attention=True,
            )
            for task, weight in (
                ("alignment", "align_weight"),
                ("next-pair", "next_weight"),
                ("relevance", "relevance_weight"),
            )
        },
        "seminar, pretrained, no G(j) (peers)": _cfg(
            PEERS,
            model={**_PSU, "gsu_projections": False},
            pretrain={"epochs": 20},
            restore_attention=True,
        ),
        **{
            f"seminar, pretrained, no {m} (peers)": _cfg(
                PEERS, model=_PSU, pretrain={"epochs": 20}, drop=[m], restore_attention=True
            )
            for m in ("text", "image", "query")
        },
    },
    # ways to restore the PSU under the defaults
    "pretrain": {
        "seminar, pretrained, embeddings only": _cfg(
            BASE, model=_PSU, pretrain={"epochs": 20}, restore_attention=False
        ),
        "seminar, pretrained on all-event windows": _cfg(
            BASE, model=_PSU, pretrain={"epochs": 20, "history": "all"}, restore_attention=True
        ),
    },
}
GRIDS["pretrain peers"] = {
    f"{k} (peers)": {**v, "history": "positive"} for k, v in GRIDS["pretrain"].items()
}
_QUERY_FEATURES = ("target_query", "target_query_tokens", "hist_query", "hist_query_tokens")


def drop_modalities(data: dict, tables: dict, drop) -> tuple:
    """``(data, tables)`` without the ``drop`` modalities (copies; the inputs are shared):
    items' text or image marked absent in the tables, or every query id and token zeroed."""
    unknown = set(drop) - {"text", "image", "query"}
    if unknown:
        raise ValueError(f"drop: unknown modalities {sorted(unknown)}")
    tables = dict(tables)
    for m in {"text", "image"} & set(drop):
        tables[f"item_has_{m}"] = np.zeros_like(tables[f"item_has_{m}"])
    if "query" in drop:
        data = {
            key: {k: np.zeros_like(v) if k in _QUERY_FEATURES else v for k, v in arrays.items()}
            for key, arrays in data.items()
        }
    return data, tables


# ----------------------------------------------------------------------------- dump (TF)
def dump(datasets, out, max_len):
    from quality import prepare  # the same preprocessing as benchmarks/quality.py

    from seminar_tf import spec
    from seminar_tf.data.dataset import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        for name in datasets:
            data_dir = prepare(name, tmp, max_len)
            dst = os.path.join(out, name)
            os.makedirs(dst, exist_ok=True)
            for f in (spec.TABLES_FILE, spec.SCHEMA_FILE):
                shutil.copy(os.path.join(data_dir, f), os.path.join(dst, f))
            for history in HISTORIES:
                for split in SPLITS:
                    ds = make_dataset(data_dir, split, 4096, max_len, history, include_meta=True)
                    cols = {}
                    for feats, label in ds:
                        for k in (*spec.MODEL_FEATURE_NAMES, "user_id"):
                            cols.setdefault(k, []).append(feats[k].numpy())
                        cols.setdefault("label", []).append(label.numpy())
                    arrays = {k: np.concatenate(v) for k, v in cols.items()}
                    for k, v in arrays.items():
                        if v.dtype == np.int64:
                            arrays[k] = v.astype(np.int32)
                        elif v.dtype == object:  # user ids: fixed-width bytes load unpickled
                            arrays[k] = v.astype(bytes)
                    path = os.path.join(dst, f"{history}_{split}.npz")
                    np.savez_compressed(path, **arrays)
                    print(f"{name} {history} {split}: {len(arrays['label'])} examples, "
                          f"{os.path.getsize(path) / 1e6:.1f} MB", flush=True)  # fmt: skip


# ------------------------------------------------------------------- run (any backend)
def _load(path):
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _split(arrays):
    from seminar_tf import spec

    x = {k: arrays[k] for k in spec.MODEL_FEATURE_NAMES}
    return x, arrays["label"].astype("float32"), arrays["user_id"]


def one_run(ds_dir, data, label, cfg, seed, verbose=0):
    import keras

    from seminar_tf import evaluation, spec
    from seminar_tf.models.factory import build_model, build_psu

    data_spec = spec.DataSpec.load(ds_dir)
    tables = _load(os.path.join(ds_dir, spec.TABLES_FILE))
    data, tables = drop_modalities(data, tables, cfg.get("drop", ()))
    keras.utils.set_random_seed(seed)
    t0 = time.time()
    hist = cfg["history"]
    x_tr, y_tr, _ = _split(data[hist, "train"])
    x_va, y_va, _ = _split(data[hist, "valid"])
    x_te, y_te, u_te = _split(data[hist, "test"])
    restored, psu_epochs = [], 0
    model = build_model(data_spec, cfg["model"], tables=tables)
    if cfg.get("pretrain"):
        pcfg = dict(cfg["pretrain"])
        p_hist = pcfg.get("history", "positive")
        p_tr = _positive(data[p_hist, "train"])
        p_va = _positive(data[p_hist, "valid"])
        psu = build_psu(data_spec, pcfg.get("model", {"num_heads": 4}), tables=tables)
        psu.compile(optimizer=keras.optimizers.Adam(pcfg.get("lr", 1e-3)))
        ph = psu.fit(
            p_tr[0], p_tr[1], batch_size=cfg["batch"], epochs=pcfg.get("epochs", 20),
            validation_data=p_va, shuffle=True, verbose=verbose,
            callbacks=[keras.callbacks.EarlyStopping(
                "val_loss", patience=cfg["patience"], restore_best_weights=True)],
        )  # fmt: skip
        psu_epochs = len(ph.history["loss"])
        restored = model.restore_pretrained(
            psu,
            include_attention=cfg.get("restore_attention", False),  # as TrainConfig
        )
    wd = cfg.get("weight_decay", 0.0)
    model.compile(
        optimizer=keras.optimizers.AdamW(cfg["lr"], weight_decay=wd)
        if wd
        else keras.optimizers.Adam(cfg["lr"]),
        loss="binary_crossentropy",
        metrics=[keras.metrics.AUC(name="auc")],
    )
    h = model.fit(
        x_tr, y_tr, batch_size=cfg["batch"], epochs=cfg["epochs"],
        validation_data=(x_va, y_va), shuffle=True, verbose=verbose,
        callbacks=[keras.callbacks.EarlyStopping(
            "val_auc", mode="max", patience=cfg["patience"], restore_best_weights=True)],
    )  # fmt: skip
    p = np.asarray(model.predict(x_te, batch_size=2048, verbose=0)).reshape(-1)
    pv = np.asarray(model.predict(x_va, batch_size=2048, verbose=0)).reshape(-1)
    return {
        "model": label,
        "seed": seed,
        "auc": evaluation.auc(y_te, p),
        "gauc": evaluation.gauc(y_te, p, u_te),
        "logloss": evaluation.logloss(y_te, p),
        "val_auc": evaluation.auc(y_va, pv),
        "val_gauc": evaluation.gauc(y_va, pv, _split(data[hist, "valid"])[2]),
        "epochs_run": len(h.history["loss"]),
        "best_epoch": int(np.argmax(h.history["val_auc"])) + 1,
        "train_auc_last": float(h.history["auc"][-1]),
        "psu_epochs": psu_epochs,
        "restored_variables": len(restored),
        "seconds": round(time.time() - t0, 1),
    }


def _positive(arrays):
    """The PSU's examples: clicked targets with their click history."""
    x, y, _ = _split(arrays)
    keep = y > 0
    return {k: v[keep] for k, v in x.items()}, y[keep]


def summarise(runs):
    rows = {}
    for r in runs:
        rows.setdefault((r["dataset"], r["model"]), []).append(r)
    out = []
    for (ds, model), rs in rows.items():
        row = {"dataset": ds, "model": model, "seeds": len(rs)}
        for key in ("auc", "gauc", "logloss", "val_auc", "val_gauc", "best_epoch"):
            vals = [r[key] for r in rs]
            row[key] = statistics.mean(vals)
            row[key + "_ci95"] = ci95(vals)
        out.append(row)
    return out


def run_parallel(args, grid, keras):
    """Runs each (dataset, configuration, seed) in its own process, ``args.jobs`` at a time
    (a small model leaves one GPU mostly idle), then merges their reports."""
    import subprocess

    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    tasks = [(ds, label, seed) for ds in args.datasets for label in grid for seed in args.seeds]
    parts = tempfile.mkdtemp(prefix=args.name + "_parts")
    grid_file = os.path.join(parts, "grid.json")
    with open(grid_file, "w") as f:
        json.dump(grid, f)
    running, names = [], []
    for i, (ds, label, seed) in enumerate(tasks):
        while len(running) >= args.jobs:
            still = [p for p in running if p.poll() is None]
            if len(still) < len(running):
                _write(args, _collect(parts, names), keras)
            running = still
            time.sleep(0.5)
        name = f"part{i:03d}"
        names.append(name)
        cmd = [sys.executable, os.path.abspath(__file__), "run", "--arrays", args.arrays,
               "--datasets", ds, "--grid", grid_file, "--models", label, "--seeds", str(seed),
               "--out", parts, "--name", name]  # fmt: skip
        running.append(subprocess.Popen(cmd, env=env))
    for p in running:
        p.wait()
    return _collect(parts, names)


def _collect(parts, names):
    runs = []
    for name in names:
        path = os.path.join(parts, name + ".json")
        if os.path.exists(path):
            with open(path) as f:
                runs.extend(json.load(f)["runs"])
    return runs


def run(args):
    import keras

    grid = {}
    for g in args.grid:
        if os.path.exists(g):
            with open(g) as f:
                grid.update(json.load(f))
        else:
            grid.update(GRIDS[g])
    if args.models:
        grid = {k: v for k, v in grid.items() if k in args.models}
    os.makedirs(args.out, exist_ok=True)
    if args.jobs > 1:
        runs = run_parallel(args, grid, keras)
        _print_summary(_write(args, runs, keras))
        return
    runs = []
    for ds in args.datasets:
        ds_dir = os.path.join(args.arrays, ds)
        data = {(h, s): _load(os.path.join(ds_dir, f"{h}_{s}.npz"))
                for h in HISTORIES for s in SPLITS}  # fmt: skip
        for label, cfg in grid.items():
            cfg = {**BASE, **cfg}
            for seed in args.seeds:
                r = one_run(ds_dir, data, label, cfg, seed, args.verbose)
                r["dataset"] = ds
                r["config"] = cfg
                runs.append(r)
                print(f"{ds:<10} {label:<34} seed {seed}: test AUC {r['auc']:.4f} GAUC "
                      f"{r['gauc']:.4f} (val {r['val_auc']:.4f}/{r['val_gauc']:.4f}, best ep "
                      f"{r['best_epoch']}/{r['epochs_run']}, {r['seconds']:.0f}s)", flush=True)  # fmt: skip
                _write(args, runs, keras)
    _print_summary(_write(args, runs, keras))


def _print_summary(summary):
    print(f"\n{'dataset':<10} {'model':<34} {'AUC':>16} {'GAUC':>16} {'val AUC':>8}")
    for r in summary:
        print(f"{r['dataset']:<10} {r['model']:<34} {r['auc']:.4f} +-{r['auc_ci95']:.4f} "
              f"{r['gauc']:.4f} +-{r['gauc_ci95']:.4f} {r['val_auc']:.4f}")  # fmt: skip


def _write(args, runs, keras):
    summary = summarise(runs)
    try:
        import jax

        device = str(jax.devices()[0].device_kind)
    except Exception:  # noqa: BLE001 (any backend without jax)
        device = "cpu"
    report = {
        "benchmark": "quality_arrays",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {device}, "
        f"Keras {keras.__version__} ({keras.backend.backend()})",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seeds": args.seeds,
        "summary": summary,
        "runs": runs,
    }
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    return summary


def _protocol_label(run):
    """``(protocol, model)`` of a run from its config (labels of older reports carried the
    protocol as a ``peers: `` prefix)."""
    model = run["model"].removeprefix("peers: ").removesuffix(" (peers)")
    peers = run["config"]["history"] == "positive"
    return ("peers' protocol" if peers else "defaults"), model


def report(args):
    """Merges run reports into one JSON, a text table and a PNG with 95% intervals."""
    runs, machines = [], set()
    for path in args.inputs:
        with open(path) as f:
            rep = json.load(f)
        machines.add(rep["machine"])
        for r in rep["runs"]:
            protocol, model = _protocol_label(r)
            runs.append({**r, "protocol": protocol, "model": model})
    keyed = {}
    for r in runs:  # a later file's run of the same cell and seed replaces an earlier one
        keyed[r["dataset"], r["protocol"], r["model"], r["seed"]] = r
    runs = list(keyed.values())
    summary = []
    for (_ds, protocol), group in _groups(runs).items():
        for row in summarise(group):
            summary.append({"protocol": protocol, **row})
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    out = {
        "benchmark": "quality_arrays",
        "machine": sorted(machines),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "protocols": {
            "defaults": "history 'all' (clicks and non-clicks with labels), up to 100 events",
            "peers' protocol": "click-only history of up to 100 events (LongCTR)",
        },
        "settings": {"defaults": BASE, "peers' protocol": PEERS},
        "public_figures_movielens_test_auc": LONGCTR,
        "summary": summary,
        "runs": runs,
    }
    with open(stem + ".json", "w") as f:
        json.dump(out, f, indent=2)
    w = max([len(r["model"]) for r in summary] + [5])
    lines = [f"{'dataset':<10} {'protocol':<16} {'model':<{w}} {'seeds':>5} {'test AUC':>17} "
             f"{'test GAUC':>17} {'val AUC':>8}"]  # fmt: skip
    for r in summary:
        lines.append(
            f"{r['dataset']:<10} {r['protocol']:<16} {r['model']:<{w}} {r['seeds']:>5} "
            f"{r['auc']:.4f} +-{r['auc_ci95']:.4f} {r['gauc']:.4f} +-{r['gauc_ci95']:.4f} "
            f"{r['val_auc']:>8.4f}"
        )
    text = "\n".join(lines)
    print(text)
    with open(stem + ".txt", "w") as f:
        f.write(text + "\n")
    _plot(summary, stem + ".png")


def _groups(runs):
    out = {}
    for r in runs:
        out.setdefault((r["dataset"], r["protocol"]), []).append(r)
    return out


def _plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["dataset"], r["protocol"]) for r in summary})
    fig, axes = plt.subplots(1, len(cells), figsize=(5.8 * len(cells), 3.8), squeeze=False)
    for ax, (ds, protocol) in zip(axes[0], cells):
        rows = [r for r in summary if (r["dataset"], r["protocol"]) == (ds, protocol)]
        y = np.arange(len(rows))
        ax.barh(y - 0.2, [r["auc"] for r in rows], 0.4, xerr=[r["auc_ci95"] for r in rows],
                label="test AUC", color="#4c72b0")  # fmt: skip
        ax.barh(y + 0.2, [r["gauc"] for r in rows], 0.4, xerr=[r["gauc_ci95"] for r in rows],
                label="test GAUC", color="#dd8452")  # fmt: skip
        ax.set_yticks(y, [f"{r['model']} ({r['seeds']})" for r in rows], fontsize=8)
        lo = min(min(r["auc"] - r["auc_ci95"], r["gauc"] - r["gauc_ci95"]) for r in rows)
        hi = max(r["auc"] + r["auc_ci95"] for r in rows)
        if ds == "movielens" and protocol != "defaults":
            for value in LONGCTR.values():
                ax.axvline(value, color="grey", ls=":", lw=0.8)
            ax.axvline(LONGCTR["DIN"], color="red", ls="--", lw=1, label="public DIN 0.693")
            hi = max(hi, LONGCTR["DIN"])
        ax.set_xlim(max(0.4, lo - 0.02), hi + 0.01)
        ax.set_title(f"{ds}, {protocol} (mean, 95% interval; seeds)", fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump")
    d.add_argument("--datasets", nargs="+", default=["movielens", "synthetic"])
    d.add_argument("--max-len", type=int, default=100)
    d.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arrays", required=True)
    r.add_argument("--datasets", nargs="+", default=["movielens"])
    r.add_argument("--grid", nargs="+", default=["defaults"],
                   help="names in GRIDS or JSON files of {label: config}")  # fmt: skip
    r.add_argument("--models", nargs="*", help="only these labels of the grid")
    r.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    r.add_argument("--out", default="benchmarks/results")
    r.add_argument("--name", default="quality_arrays")
    r.add_argument("--verbose", type=int, default=0)
    r.add_argument("--jobs", type=int, default=1, help="processes at a time")
    m = sub.add_parser("report", help="merge run reports: JSON, table and PNG")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", default="benchmarks/results")
    m.add_argument("--name", default="quality_arrays")
    args = p.parse_args()
    if args.cmd == "dump":
        dump(args.datasets, args.out, args.max_len)
    elif args.cmd == "report":
        report(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
