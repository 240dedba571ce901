"""User features through every stage: the user vocabulary and stored user ids
(preprocessing), the reader's ``user``, the model's user tower and history statistics, old
models without it, export (range check, empty vocabulary) and the client."""

from __future__ import annotations

import dataclasses
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from seminar_tf import spec, testing  # noqa: E402
from seminar_tf.models import build_model  # noqa: E402
from seminar_tf.models.seminar import history_statistics  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
OLD_MODEL = os.path.join(HERE, "data", "pre_user_features_model.keras")
SMALL = {"embedding_dim": 8, "num_heads": 2, "top_k": 4, "hidden_units": [8]}


def _numpy_stats(hist_item, hist_label, user_counts=None):
    """The statistics computed independently, row by row."""
    out = []
    counts = np.zeros((len(hist_item), 3)) if user_counts is None else np.asarray(user_counts)
    for items, labels, (events, clicks, gap) in zip(
        np.asarray(hist_item), np.asarray(hist_label), counts
    ):
        real = [int(lab) for it, lab in zip(items, labels) if it != 0]
        rate = sum(real) / len(real) if real else 0.0
        user_rate = clicks / events if events else 0.0
        out.append([np.log1p(len(real)), rate, np.log1p(events), user_rate, np.log1p(gap / 3600)])
    return np.asarray(out, np.float32)


# ------------------------------------------------------------------------- preprocessing
@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """Events of 3 users (u_heavy: 12 events, u_mid: 6, u_rare: 1) preprocessed with
    ``--min-user-count 2`` through the CLI."""
    from seminar_tf.cli import main

    root = tmp_path_factory.mktemp("users")
    items = [{"item_id": f"i{i}", "text": "", "attributes": [f"a{i % 3}"]} for i in range(8)]
    events, t = [], 1_000
    for user, n in (("u_heavy", 12), ("u_mid", 6), ("u_rare", 1)):
        for j in range(n):
            t += 10
            events.append({"user_id": user, "timestamp": t, "item_id": f"i{(j * 3) % 8}",
                           "query": "", "label": (j + len(user)) % 2})  # fmt: skip
    with open(root / "events.jsonl", "w") as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))
    with open(root / "items.jsonl", "w") as f:
        f.write("".join(json.dumps(i) + "\n" for i in items))
    out = str(root / "data")
    rc = main(["preprocess", "--events", str(root / "events.jsonl"), "--items",
               str(root / "items.jsonl"), "--out", out, "--max-len", "8", "--split", "last",
               "--min-user-count", "2"])  # fmt: skip
    assert rc == 0
    return out


def test_user_vocabulary_and_stored_user_ids(user_data):
    from seminar_tf.data.dataset import example_files, parse_spec

    with open(os.path.join(user_data, spec.VOCAB_DIR, "users.txt")) as f:
        users = [line.rstrip("\n") for line in f]
    assert users == ["u_heavy", "u_mid"]  # by count; u_rare (1 event) is below the minimum
    data_spec = spec.DataSpec.load(user_data)
    assert data_spec.num_users == len(users) + spec.NUM_RESERVED_IDS
    stats = json.load(open(os.path.join(user_data, spec.STATS_FILE)))
    assert stats["accounting_ok"] and stats["used_events"] == 19
    stored = {}
    for path in example_files(user_data):
        for raw in tf.data.TFRecordDataset(path):
            record = tf.io.parse_single_example(raw, parse_spec())
            stored[record["user_id"].numpy().decode()] = int(record["user"])
    assert stored == {"u_heavy": 2, "u_mid": 3, "u_rare": spec.OOV_ID}


def test_reader_user_is_the_vocabulary_id_of_the_raw_user(user_data):
    from seminar_tf.data.dataset import make_dataset

    with open(os.path.join(user_data, spec.VOCAB_DIR, "users.txt")) as f:
        ids = {line.rstrip("\n"): i + 2 for i, line in enumerate(f)}
    seen = set()
    for split in spec.SPLIT_NAMES:
        for features, _ in make_dataset(user_data, split, 4, include_meta=True, history="all"):
            for user_id, user in zip(features["user_id"].numpy(), features["user"].numpy()):
                assert user == ids.get(user_id.decode(), spec.OOV_ID)
                seen.add(int(user))
    assert seen == {2, 3, spec.OOV_ID}


def test_old_output_without_user_vocabulary_is_refused_clearly(user_data, tmp_path):
    data_spec = spec.DataSpec.load(user_data)
    old = spec.DataSpec.from_json(
        {k: v for k, v in data_spec.to_json().items() if k != "num_users"}
    )
    assert old.num_users == 0
    with pytest.raises(ValueError, match="re-run `seminar preprocess`"):
        build_model(old, SMALL)
    assert build_model(old, {**SMALL, "use_user_features": False}).use_user_features is False


# ------------------------------------------------------------------ statistics, no leakage
def test_history_statistics_match_numpy():
    ds = testing.make_data_spec()
    features = testing.make_features(ds, 32, seed=4, padding="mixed")
    features["hist_item"][0] = 0  # an empty history: count 0, rate 0
    features["user_counts"][0] = 0  # a user with no earlier events
    args = (features["hist_item"], features["hist_label"], features["user_counts"])
    got = np.asarray(history_statistics(*args))
    np.testing.assert_allclose(got, _numpy_stats(*args), rtol=1e-5)
    np.testing.assert_array_equal(got[0], [0.0] * 5)
    for col in (1, 3, 4):  # rates and gaps really vary
        assert len({round(float(r), 4) for r in got[:, col]}) > 3
    without = np.asarray(history_statistics(*args[:2]))
    np.testing.assert_allclose(without, _numpy_stats(*args[:2]), rtol=1e-5)


def test_history_statistics_ignore_the_target_and_later_events():
    """Only events strictly earlier than the target enter its window (and so its
    statistics): changing the target, ties and everything after it changes nothing."""
    from seminar_tf.data.dataset import cut_windows

    ts = np.array([1, 2, 3, 3, 4, 5, 6], np.int64)
    record = {
        "timestamp": ts,
        "item": np.array([2, 3, 4, 5, 6, 7, 8], np.int64),
        "query": np.zeros(7, np.int64),
        "query_tokens": np.zeros(7 * 2, np.int64),
        "label": np.array([1, 0, 1, 0, 1, 1, 0], np.int64),
        "user_id": tf.constant(b"u"),
        "user": tf.constant(5, tf.int64),
    }
    target = tf.constant([3], tf.int64)  # timestamp 3: the event at index 2 is a tie

    # the chunk holds the user's events after 10 earlier ones (4 of them clicks)
    record.update(events_before=tf.constant(10, tf.int64), clicks_before=tf.constant(4, tf.int64))

    def stats(rec, history="all"):
        w = cut_windows({k: tf.constant(v) for k, v in rec.items()}, target, 6, 2, history)
        return np.asarray(history_statistics(w["hist_item"], w["hist_label"], w["user_counts"]))

    before = stats(record)
    expected = _numpy_stats([[2, 3]], [[1, 0]], [[12, 5, 3 - 2]])
    np.testing.assert_allclose(before, expected, rtol=1e-6)
    # the click-only window still gets the user's whole-history counts
    positive = stats(record, "positive")
    np.testing.assert_allclose(positive, _numpy_stats([[2]], [[1]], [[12, 5, 1]]), rtol=1e-6)
    np.testing.assert_array_equal(stats(dict(record, timestamp=ts * 100))[0, 2:4], before[0, 2:4])
    changed = dict(record, label=np.array([1, 0, 0, 1, 0, 0, 1], np.int64),
                   item=np.array([2, 3, 9, 9, 0 + 9, 9, 9], np.int64))  # fmt: skip
    np.testing.assert_array_equal(stats(changed), before)
    earlier = dict(record, label=np.array([0, 0, 1, 0, 1, 1, 0], np.int64))
    assert not np.array_equal(stats(earlier), before)  # the check can fail


def test_user_counts_across_chunks_match_the_raw_events(tmp_path):
    """``user_counts`` from the reader equal counts over the raw events strictly earlier
    than each target (ties excluded), also when the user's events span many stored chunks
    and whatever the history mode."""
    from seminar_tf.cli import main
    from seminar_tf.data.dataset import make_dataset

    rng = np.random.default_rng(7)
    items = [{"item_id": f"i{i}", "text": "", "attributes": []} for i in range(6)]
    events = []
    for u, n in (("a", 23), ("b", 9), ("c", 2)):
        ts = np.sort(rng.integers(0, 40, size=n)) * 60 + 100_000  # many ties
        for t in ts:
            events.append({"user_id": u, "timestamp": int(t), "item_id": f"i{rng.integers(6)}",
                           "query": "", "label": int(rng.integers(2))})  # fmt: skip
    # preprocessing drops exact duplicates: keep one copy, so every event counts
    events = list({json.dumps(e, sort_keys=True): e for e in events}.values())
    for name, rows in (("events", events), ("items", items)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "data")
    assert main(["preprocess", "--events", str(tmp_path / "events.jsonl"), "--items",
                 str(tmp_path / "items.jsonl"), "--out", out, "--max-len", "3",
                 "--chunk-size", "4", "--split", "last"]) == 0  # fmt: skip
    seen = 0
    for history in ("all", "positive"):
        for split in spec.SPLIT_NAMES:
            for features, _ in make_dataset(out, split, 8, history=history, include_meta=True):
                for u, t, counts in zip(features["user_id"].numpy(), features["timestamp"].numpy(),
                                        features["user_counts"].numpy()):  # fmt: skip
                    earlier = [
                        e for e in events if e["user_id"] == u.decode() and e["timestamp"] < t
                    ]
                    gap = t - max(e["timestamp"] for e in earlier) if earlier else 0
                    clicks = sum(e["label"] for e in earlier)
                    assert counts.tolist() == [len(earlier), clicks, gap]
                    seen += 1
    assert seen == 2 * len(events)  # every event is a target once per history mode


# --------------------------------------------------------------------------- the model
def test_model_saved_before_user_features_loads_and_predicts_the_same():
    """A model saved by the code before this change (tests/data, made with ``git archive``
    of that commit): loads without a user tower, predicts from inputs without ``user`` as
    it did, and a new ``use_user_features=False`` model with its weights is the same."""
    import seminar_tf.models  # noqa: F401

    saved = np.load(OLD_MODEL.replace(".keras", ".npz"))
    features = {k: saved[k] for k in saved.files if k != "probability"}
    assert "user" not in features
    old = keras.saving.load_model(OLD_MODEL)
    assert old.use_user_features is False
    np.testing.assert_allclose(np.asarray(old(features)), saved["probability"], rtol=1e-5)
    # That model predates the query_tokens table too (its config has no max_query_tokens).
    ds = dataclasses.replace(testing.make_data_spec(max_len=8), max_query_tokens=0)
    new = build_model(ds, {**SMALL, "use_user_features": False}, testing.make_tables(ds))

    def paths(m):
        return [v.path.split("/", 1)[1] for v in m.weights]

    assert paths(new) == paths(old)
    new.set_weights(old.get_weights())
    with_user = dict(features, user=np.arange(len(features["target_item"])))
    np.testing.assert_allclose(np.asarray(new(with_user)), saved["probability"], rtol=1e-5)


def test_user_tower_config_save_load_and_padding(tmp_path):
    ds = testing.make_data_spec()
    model = build_model(ds, {**SMALL, "user_embedding_l2": 1e-3}, testing.make_tables(ds))
    config = model.get_config()
    assert config["use_user_features"] is True and config["num_users"] == ds.num_users
    assert config["user_embedding_l2"] == 1e-3 and len(model.losses) == 1
    features = testing.make_features(ds, 16, seed=2)
    features["user"][:4] = 0
    p = np.asarray(model(features))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_config() == config
    np.testing.assert_allclose(np.asarray(loaded(features)), p, rtol=1e-6)
    # Padding id 0 is a zero vector: its table row does not matter; a missing user is 0.
    model.user_embeddings.assign(np.asarray(model.user_embeddings) + 1.0)
    q = np.asarray(model(features))
    np.testing.assert_allclose(q[:4], p[:4], rtol=1e-6)
    assert not np.allclose(q[4:], p[4:])
    no_user = {k: v for k, v in features.items() if k != "user"}
    zero = dict(features, user=np.zeros_like(features["user"]))
    np.testing.assert_allclose(np.asarray(model(no_user)), np.asarray(model(zero)), rtol=1e-6)
    # Every preset has the tower, the dnn too; False has none.
    assert build_model(ds, {"preset": "dnn"}).user_stats is not None
    assert not any("user" in v.path for v in build_model(
        ds, {**SMALL, "use_user_features": False}).weights)  # fmt: skip


def test_jax_backend_builds_and_fits_a_user_model(run_script):
    out = run_script(
        """
        import keras, numpy as np
        from seminar_tf import testing
        from seminar_tf.models import build_model
        ds = testing.make_data_spec()
        model = build_model(ds, {"embedding_dim": 8, "num_heads": 2, "top_k": 4,
                                 "hidden_units": [8], "user_embedding_l2": 1e-4},
                            testing.make_tables(ds))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        x, y = testing.make_batch(ds, 32)
        before = np.asarray(model.user_embeddings).copy()
        h = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        assert np.isfinite(h.history["loss"][-1])
        assert not np.allclose(before, np.asarray(model.user_embeddings))
        print("backend", keras.backend.backend())
        """,
        "jax",
    )
    assert "backend jax" in out


def test_planted_per_user_propensity_is_learned_only_with_user_features():
    """Labels depend on the user alone (each user clicks with probability 0.1 or 0.9;
    history labels are noise): with user features the validation AUC is far above the
    model without them."""
    ds = testing.make_data_spec(num_users=42, max_len=6)
    tables = testing.make_tables(ds)
    rng = np.random.default_rng(0)
    propensity = np.where(rng.random(ds.num_users) < 0.5, 0.1, 0.9)

    def data(n, seed):
        x = testing.make_features(ds, n, seed=seed)
        x["user"] = rng.integers(2, ds.num_users, size=n).astype(np.int64)
        return x, (rng.random(n) < propensity[x["user"]]).astype(np.float32)

    (x, y), (xv, yv) = data(3000, 1), data(1000, 2)
    aucs = {}
    for flag in (True, False):
        keras.utils.set_random_seed(0)
        model = build_model(ds, {"preset": "dnn", "embedding_dim": 8, "hidden_units": [16],
                                 "dropout": 0.0, "use_user_features": flag}, tables)  # fmt: skip
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
        model.fit(x, y, epochs=4, batch_size=128, verbose=0)
        aucs[flag] = testing.roc_auc(yv, np.asarray(model.predict(xv, verbose=0)))
    assert aucs[True] > 0.75 and aucs[True] > aucs[False] + 0.15, aucs


def test_whole_history_click_rate_is_learned_from_a_click_only_window():
    """Unknown users (id 0) whose labels follow their whole-history click rate, seen only
    through ``user_counts``: the click-only window (every ``hist_label`` 1) carries nothing
    of it, the counts do, so the model learns it; with the counts zeroed it cannot."""
    ds = testing.make_data_spec(num_users=10, max_len=6)
    tables = testing.make_tables(ds)
    rng = np.random.default_rng(3)

    def data(n, seed):
        x = testing.make_features(ds, n, seed=seed)
        x["user"] = np.zeros(n, np.int64)
        x["hist_label"] = (x["hist_item"] != 0).astype(np.int64)
        events = rng.integers(10, 500, size=n)
        rate = rng.random(n)
        gap = rng.integers(1, 10**6, size=n)
        x["user_counts"] = np.stack([events, (rate * events).astype(int), gap], 1)
        return x, (rng.random(n) < rate).astype(np.float32)

    (x, y), (xv, yv) = data(3000, 1), data(1000, 2)
    aucs = {}
    for zeroed in (False, True):
        keras.utils.set_random_seed(0)
        model = build_model(ds, {"preset": "dnn", "embedding_dim": 8, "hidden_units": [16],
                                 "dropout": 0.0}, tables)  # fmt: skip
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
        counts = (
            (lambda f: dict(f, user_counts=np.zeros_like(f["user_counts"]))) if zeroed else dict
        )
        model.fit(counts(x), y, epochs=4, batch_size=128, verbose=0)
        aucs[zeroed] = testing.roc_auc(yv, np.asarray(model.predict(counts(xv), verbose=0)))
    assert aucs[False] > 0.75 and aucs[False] > aucs[True] + 0.15, aucs


# ---------------------------------------------------------------------- export, client
def test_empty_user_vocabulary_lookup(tmp_path):
    from export.graph import EmptyVocabularyLookup, Vocabularies

    os.makedirs(tmp_path / spec.VOCAB_DIR)
    for file in spec.VOCAB_FILES.values():
        (tmp_path / spec.VOCAB_DIR / file).write_text("")
    (tmp_path / spec.VOCAB_DIR / "items.txt").write_text("i1\n")
    voc = Vocabularies(str(tmp_path), users=True)
    assert isinstance(voc.lookups["user"], EmptyVocabularyLookup)
    assert voc.lookup("user", tf.constant(["", "u1"])).numpy().tolist() == [0, 1]
    (tmp_path / spec.VOCAB_DIR / "users.txt").unlink()
    Vocabularies(str(tmp_path))  # a model without user features needs no users.txt
    with pytest.raises(FileNotFoundError, match="users.txt"):
        Vocabularies(str(tmp_path), users=True)


def test_encoded_user_out_of_range_is_invalid_argument(tiny):
    from export import writer

    loaded = tf.saved_model.load(writer.version_dir(tiny["export"], spec.RANKING_MODEL))
    fn = loaded.signatures["rank_encoded"]
    meta = writer.read_metadata(writer.version_dir(tiny["export"], spec.RANKING_MODEL))
    assert meta["user_features"] is True
    num_users = meta["vocab_sizes"]["user"]
    inputs = {n: tf.zeros(s.shape.as_list()[:0] + [1] + s.shape.as_list()[1:], s.dtype)
              for n, s in fn.structured_input_signature[1].items()}  # fmt: skip
    fn(**inputs)
    for bad in (num_users, -1):
        with pytest.raises(tf.errors.InvalidArgumentError, match="user"):
            fn(**dict(inputs, user=tf.constant([bad], tf.int64)))


def test_negative_user_counts_are_invalid_argument(tiny):
    from export import writer

    loaded = tf.saved_model.load(writer.version_dir(tiny["export"], spec.RETRIEVAL_MODEL))
    for name in ("retrieve", "retrieve_encoded"):
        fn = loaded.signatures[name]
        specs = fn.structured_input_signature[1]
        assert specs["user_counts"].shape.as_list() == [None, 3]
        inputs = {n: tf.zeros([1] + [d or 2 for d in s.shape.as_list()[1:]], s.dtype)
                  for n, s in specs.items()}  # fmt: skip
        fn(**inputs)
        bad = tf.constant([[4, 2, -1]], tf.int64)
        with pytest.raises(tf.errors.InvalidArgumentError, match="user_counts"):
            fn(**dict(inputs, user_counts=bad))


def test_client_sends_user_counts_given_or_counted_and_refuses_bad_ones(tiny):
    from serving import local_server
    from serving.client import CascadeClient, ServingError

    with open(os.path.join(tiny["data"], spec.VOCAB_DIR, spec.VOCAB_FILES["item"])) as f:
        items = [line.rstrip("\n") for line in f]
    history = [{"item_id": items[i], "label": i % 2} for i in (3, 5, 8)]
    candidates = [{"item_id": items[i]} for i in (1, 2, 4)]

    def probabilities(ranked):
        return {r["item_id"]: r["probability"] for r in ranked}

    with local_server.LocalServer.from_export(tiny["export"]) as server:
        with CascadeClient(server.grpc_target) as client:
            counted = probabilities(client.rank_candidates(history, candidates))
            # the client counts the history: 3 events, 2 clicks (labels i % 2: 1, 1, 0)
            same = probabilities(client.rank_candidates(history, candidates, user_counts=(3, 2, 0)))
            other = client.rank_candidates(history, candidates, user_counts=(900, 12, 86_400))
            for bad in ((1, 2), (-1, 0, 0), (1.5, 1, 0), "abc", (True, 0, 0)):
                with pytest.raises(ServingError) as err:
                    client.rank_candidates(history, candidates, user_counts=bad)
                assert err.value.field == "user_counts"
    assert same == counted
    assert probabilities(other) != counted


def test_client_sends_the_user_over_the_local_server(tiny):
    from serving import local_server
    from serving.client import CascadeClient

    def lines(kind):
        with open(os.path.join(tiny["data"], spec.VOCAB_DIR, spec.VOCAB_FILES[kind])) as f:
            return [line.rstrip("\n") for line in f]

    items, users = lines("item"), lines("user")
    history = [{"item_id": items[i], "label": 1} for i in (3, 5, 8)]
    candidates = [{"item_id": items[i]} for i in (1, 2, 4)]
    model = keras.saving.load_model(os.path.join(tiny["model"], "model.keras"))
    with local_server.LocalServer.from_export(tiny["export"]) as server:
        with CascadeClient(server.grpc_target) as client:
            answers = {
                u: {r["item_id"]: r["probability"]
                    for r in client.rank_candidates(history, candidates, user_id=u)}
                for u in (users[0], users[1], "never-seen", "", None)
            }  # fmt: skip
    assert answers[""] == answers[None]
    assert answers[users[0]] != answers[users[1]] != answers["never-seen"]
    # The served answer is the Keras model's for the user's vocabulary id.
    item_id = {v: i + 2 for i, v in enumerate(items)}
    hist = np.array([[0] + [item_id[h["item_id"]] for h in history]] * 3, np.int64)
    features = {
        "target_item": np.array([item_id[c["item_id"]] for c in candidates], np.int64),
        "target_query": np.zeros(3, np.int64), "target_query_tokens": np.zeros((3, 5), np.int64),
        "hist_item": hist, "hist_query": np.zeros_like(hist),
        "hist_query_tokens": np.zeros(hist.shape + (5,), np.int64),
        "hist_label": (hist > 0).astype(np.int64),
    }  # fmt: skip
    q = spec.DataSpec.load(tiny["data"]).max_query_tokens
    features["target_query_tokens"] = np.zeros((3, q), np.int64)
    features["hist_query_tokens"] = np.zeros(hist.shape + (q,), np.int64)
    # without user_counts the client counts the given history: 3 events, 3 clicks, gap 0
    features["user_counts"] = np.array([[3, 3, 0]] * 3, np.int64)
    for user, uid in ((users[1], 3), ("never-seen", spec.OOV_ID), ("", spec.PAD_ID)):
        expected = np.asarray(model(dict(features, user=np.full(3, uid, np.int64))))
        got = [answers[user][c["item_id"]] for c in candidates]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
