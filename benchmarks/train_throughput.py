"""Training and evaluation speed: each change side by side with the landed graph, one run.

Rows (all on the machine that runs the script; the JSON names it):

- ``synthetic`` train and forward examples/s of SeminarCTR (SEMINAR preset, d=64, 4 heads,
  top_k 50, ``--items`` items (20,000), 384-d text and 512-d image vectors, 4 query
  tokens) on random inputs from ``seminar_tf.testing`` for L in ``--lengths``: ``full graph``
  (``reembed_kept=False``: the gradient flows through all L behaviours, the landed graph)
  against ``reembed kept`` (the default: the history is searched without gradient and the
  kept K embedded again with it), and the no-history DNN preset as the floor. ``model.fit``
  on numpy arrays; ``compact inputs``: int32 ids and no ``hist_query_tokens`` (the model's
  ``query_tokens`` table gives them), and under JAX the same from batches already on the
  accelerator (the step without the input copy); the median of ``--repeats`` timed epochs after one warm-up epoch,
  variants interleaved so machine noise hits each alike.
- ``movielens`` (``../shared/data/movielens-small``, or ``SEMINAR_MOVIELENS``): one training
  epoch of the defaults (``seminar train``'s config, one epoch) with each graph, examples/s
  and validation AUC; then ``seminar evaluate``'s ranking protocol (each positive against 99
  sampled items) on the trained model, repeating each row per candidate (before) against
  ``SeminarCTR.score_candidates`` (the history encoded once per row), with the metrics of
  both (they must agree).

Usage: python benchmarks/train_throughput.py [--quick] [--lengths 100 1000] [--out DIR]
       KERAS_BACKEND=jax python benchmarks/train_throughput.py --data MOVIELENS_OUT ...
       (on the GPU machine, which has no TensorFlow: the numpy reader feeds it)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seminar_tf import spec, testing, training  # noqa: E402
from seminar_tf.models import build_model  # noqa: E402

MODEL = {"preset": "seminar", "embedding_dim": 64, "num_heads": 4, "top_k": 50}
VARIANTS = {
    "full graph": {**MODEL, "reembed_kept": False},
    "reembed kept": {**MODEL, "reembed_kept": True},
    "dnn (no history)": {"preset": "dnn", "embedding_dim": 64},
}
COMPACT = "reembed kept, compact inputs"
ON_DEVICE = "reembed kept, compact, on device"


class _EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self._t = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = getattr(self, "seconds", []) + [time.perf_counter() - self._t]


class _OnDevice(keras.utils.PyDataset):
    """The same batches, each put on the accelerator once up front: ``fit`` then times the
    step alone, without the host-to-device copy of the inputs."""

    def __init__(self, x, y, batch):
        super().__init__()
        from keras import ops

        n = len(y) // batch
        self._batches = [
            (
                {k: ops.convert_to_tensor(v[i * batch : (i + 1) * batch]) for k, v in x.items()},
                ops.convert_to_tensor(y[i * batch : (i + 1) * batch]),
            )
            for i in range(n)
        ]

    def __len__(self):
        return len(self._batches)

    def __getitem__(self, i):
        return self._batches[i]


def synthetic_rows(lengths, batches, steps, repeats, num_items=20_000) -> list:
    rows = []
    for length, batch in zip(lengths, batches):
        ds = testing.make_data_spec(
            num_items=num_items, num_attributes=500, num_query_tokens=5_000, num_queries=5_000,
            max_attributes=4, max_query_tokens=4, text_dim=384, image_dim=512,
            query_text_dim=384, max_len=length, num_users=1_000,
        )  # fmt: skip
        tables = testing.make_tables(ds)
        x, y = testing.make_batch(ds, batch * steps, seed=1, min_history=length, padding="left")
        # Compact inputs: int32 ids, and no per-behaviour query tokens (the model's
        # query_tokens table gives them from the query ids): 12 bytes a behaviour (3 x int32), not 56 (7 x int64).
        compact = {k: v.astype(np.int32) for k, v in x.items() if k != "hist_query_tokens"}
        variants = {**VARIANTS, COMPACT: VARIANTS["reembed kept"]}
        on_device = None
        if keras.backend.backend() == "jax":  # an accelerator: also time the step alone
            on_device = _OnDevice(compact, y, batch)
            variants[ON_DEVICE] = VARIANTS["reembed kept"]
        models = {}
        for name, config in variants.items():
            keras.utils.set_random_seed(0)
            model = build_model(ds, config, tables)
            model.compile(optimizer="adam", loss="binary_crossentropy")
            models[name] = model
            inputs = compact if name == COMPACT else x
            _fit_and_predict(model, name, inputs, y, batch, on_device)  # compile + warm up
        train, forward = {n: [] for n in models}, {n: [] for n in models}
        for _ in range(repeats):
            for name, model in models.items():
                inputs = compact if name == COMPACT else x
                train_s, forward_s = _fit_and_predict(model, name, inputs, y, batch, on_device)
                train[name].append(len(y) / train_s)
                forward[name].append(len(y) / forward_s)
        base = statistics.median(train["full graph"])
        for name in models:
            med = statistics.median(train[name])
            rows.append({
                "section": "synthetic", "L": length, "batch": batch, "variant": name,
                "train_ex_per_s": round(med, 1),
                "train_ex_per_s_runs": [round(v, 1) for v in train[name]],
                "forward_ex_per_s": round(statistics.median(forward[name]), 1),
                "speedup_vs_full_graph": round(med / base, 2),
            })  # fmt: skip
            print(_fmt(rows[-1]), flush=True)
    return rows


def _fit_and_predict(model, name, x, y, batch, on_device):
    """Seconds of one training epoch and of one prediction pass over ``x``."""
    timer = _EpochTimer()
    if name == ON_DEVICE:
        model.fit(on_device, epochs=1, verbose=0, callbacks=[timer])
        t = time.perf_counter()
        model.predict(on_device, verbose=0)
    else:
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0, callbacks=[timer])
        t = time.perf_counter()
        model.predict(x, batch_size=batch, verbose=0)
    return timer.seconds[0], time.perf_counter() - t


def movielens_rows(tmp: str, max_ranked: int | None, data_dir: str | None = None) -> list:
    from seminar_tf import evaluation

    if data_dir is None:  # preprocessing needs TensorFlow and Beam; --data skips it
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from quality import prepare

        t0 = time.time()
        data_dir = prepare("movielens", tmp, max_len=1000)
        print(f"movielens: preprocessed in {time.time() - t0:.0f}s", flush=True)
    rows, model_dirs = [], {}
    for name in ("full graph", "reembed kept"):
        cfg = training.TrainConfig(epochs=1, seed=0, model={"reembed_kept": name != "full graph"})
        out = os.path.join(tmp, name.replace(" ", "_"))
        t = time.time()
        _, history = training.train(data_dir, out, cfg)
        seconds = time.time() - t
        rows.append({
            "section": "movielens train (1 epoch, defaults)", "variant": name,
            "train_ex_per_s": round(statistics.median(history["examples_per_sec"]), 1),
            "seconds": round(seconds, 1), "val_auc": round(history["val_auc"][-1], 4),
        })  # fmt: skip
        print(_fmt(rows[-1]), flush=True)
        model_dirs[name] = out
    base = rows[0]["train_ex_per_s"]
    for row in rows:
        row["speedup_vs_full_graph"] = round(row["train_ex_per_s"] / base, 2)

    model_dir = model_dirs["reembed kept"]
    model = training.load_model(model_dir)
    with open(os.path.join(model_dir, training.CONFIG_FILE)) as f:
        tcfg = json.load(f)["train"]
    data_spec = spec.DataSpec.load(data_dir)
    fast = training._compiled_score_candidates(model)

    def predict(features):
        return np.asarray(model.predict_on_batch(features)).reshape(-1)

    ranking = {}
    rank_cfg = training.TrainConfig(batch_size=10, max_len=tcfg["max_len"], history=tcfg["history"])
    reader = training.reader_of(rank_cfg)
    for name, kwargs in (("repeat rows", {}), ("score_candidates", {"score_candidates": fast})):
        rank_ds = training.windows(
            data_dir, "test", rank_cfg, reader, targets="positive", trim=True
        )
        t = time.time()
        report = evaluation.evaluate_ranking(
            predict, rank_ds, data_spec.num_items, 99, seed=0, max_positives=max_ranked, **kwargs
        )
        ranking[name] = (time.time() - t, report)
    before = ranking["repeat rows"][0]
    for name, (seconds, report) in ranking.items():
        rows.append({
            "section": "movielens evaluate ranking (99 negatives)", "variant": name,
            "positives": report["ranked_positives"], "seconds": round(seconds, 1),
            "speedup_vs_repeat_rows": round(before / seconds, 2),
            "hr@10": round(report["hr@10"], 4), "ndcg@10": round(report["ndcg@10"], 4),
        })  # fmt: skip
        print(_fmt(rows[-1]), flush=True)
    return rows


def topk_rows(repeats: int = 7) -> list:
    """The GSU's exact top-K: one ``top_k`` over L against ``_ops.top_k_by_blocks`` (blocks
    of ``TopKSearch.AUTO_BLOCK``), compiled, median of ``repeats``; the indices must agree."""
    from keras import ops

    from seminar_tf.compiled import compiled
    from seminar_tf.layers import TopKSearch, _ops

    rng = np.random.default_rng(0)
    block = TopKSearch.AUTO_BLOCK
    rows = []
    for length, batch, k in [(1_000, 256, 50), (10_000, 256, 50), (10_000, 256, 100),
                             (100_000, 64, 100)]:  # fmt: skip
        scores = rng.normal(size=(batch, length)).astype("float32")
        scores[:, ::7] = 1.0  # ties, broken by position either way
        x = ops.convert_to_tensor(scores)
        plain = compiled(lambda a, k=k: ops.top_k(a, k=k, sorted=True))
        blocks = compiled(lambda a, k=k: _ops.top_k_by_blocks(a, k, block))
        times = {}
        for name, fn in (("top_k over L", plain), (f"blocks of {block}", blocks)):
            indices = np.asarray(ops.convert_to_numpy(fn(x)[1]))
            times[name] = []
            for _ in range(repeats):
                t = time.perf_counter()
                np.asarray(ops.convert_to_numpy(fn(x)[1]))
                times[name].append(time.perf_counter() - t)
            times[name + " indices"] = indices
        names = list(times)[::2]
        same = bool(np.array_equal(times[names[0] + " indices"], times[names[1] + " indices"]))
        base = statistics.median(times[names[0]])
        for name in names:
            med = statistics.median(times[name])
            rows.append({
                "section": "gsu top-k", "L": length, "batch": batch, "k": k, "variant": name,
                "ms": round(med * 1e3, 2), "speedup": round(base / med, 2), "same_indices": same,
            })  # fmt: skip
            print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(row: dict) -> str:
    return "  ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_runs"))


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    synth = [r for r in rows if r["section"] == "synthetic"]
    if not synth:  # --sections topk alone: a table is enough
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lengths = sorted({r["L"] for r in synth})
    names = [n for n in [*VARIANTS, COMPACT, ON_DEVICE] if any(r["variant"] == n for r in synth)]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [next((r["train_ex_per_s"] for r in synth if r["L"] == n and
                        r["variant"] == name), 0) for n in lengths]  # fmt: skip
        axes[0].bar(np.arange(len(lengths)) + i * width, values, width, label=name)
    axes[0].set_xticks(np.arange(len(lengths)) + width, [f"L={n}" for n in lengths])
    axes[0].set_ylabel("train examples / s")
    axes[0].set_title("synthetic inputs (median)")
    axes[0].legend()
    other = [r for r in rows if r["section"].startswith("movielens")]
    labels = [f"{r['section'].split(' (')[0]}\n{r['variant']}" for r in other]
    axes[1].barh(labels, [r["seconds"] for r in other])
    axes[1].set_xlabel("seconds")
    axes[1].set_title("MovieLens")
    fig.suptitle(f"{platform.node()} ({keras.backend.backend()})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 1000])
    parser.add_argument(
        "--batch", type=int, nargs="+", default=[256], help="one per length, or one for all"
    )
    parser.add_argument("--items", type=int, default=20_000, help="catalog size (synthetic)")
    parser.add_argument("--steps", type=int, default=8, help="batches per timed epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-movielens", action="store_true")
    parser.add_argument(
        "--sections",
        nargs="+",
        default=["synthetic", "movielens", "topk"],
        choices=["synthetic", "movielens", "topk"],
    )
    parser.add_argument("--max-ranked", type=int, default=None)
    parser.add_argument(
        "--data",
        help="an existing `seminar preprocess` output of MovieLens (--max-len 1000) "
        "instead of preprocessing here: what a machine without TensorFlow needs",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.steps, args.repeats, args.batch = [50], 2, 1, [32]
        args.skip_movielens = True
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "machine": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or ''}",
        "backend": keras.backend.backend(),
        "devices": [str(d) for d in keras.distribution.list_devices()]
        if keras.backend.backend() == "jax"
        else None,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    name = "train_throughput" + ("_quick" if args.quick else "")
    if args.sections == ["topk"]:
        name += f"_topk_{keras.backend.backend()}"
    rows = []
    if "synthetic" in args.sections:
        batches = args.batch * len(args.lengths) if len(args.batch) == 1 else args.batch
        if len(batches) != len(args.lengths):
            parser.error("--batch takes one value, or one per --lengths value")
        rows += synthetic_rows(args.lengths, batches, args.steps, args.repeats, args.items)
        save(rows, meta, args.out, name)  # a later section that fails keeps these
    if "topk" in args.sections and not args.quick:
        rows += topk_rows()
        save(rows, meta, args.out, name)
    if "movielens" in args.sections and not args.skip_movielens:
        with tempfile.TemporaryDirectory() as tmp:
            rows += movielens_rows(tmp, args.max_ranked, args.data)
        save(rows, meta, args.out, name)
    print(f"wrote {args.out}/{name}.json .txt .png")


def save(rows, meta, out, name):
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, name + ".txt"), "w") as f:
        f.write(json.dumps(meta) + "\n" + "\n".join(_fmt(r) for r in rows) + "\n")
    plot(rows, os.path.join(out, name + ".png"))


if __name__ == "__main__":
    main()
