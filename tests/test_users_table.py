"""The optional users table (``seminar preprocess --users``) and user-id hashing
(``--user-hash-buckets``): dead letters and accounting, the user side tables indexed by the
user vocabulary (OOV and unknown users empty), the model's use of a user's attributes and
vector (every preset, save/load), the export and a served answer that looks them up from
``user_id`` alone, and the hash agreeing between preprocessing and the exported graph."""

from __future__ import annotations

import glob
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from seminar_tf import spec, testing, training  # noqa: E402
from seminar_tf.models import build_model  # noqa: E402
from seminar_tf.models.factory import PRESETS  # noqa: E402

SMALL = {"embedding_dim": 8, "num_heads": 2, "top_k": 4, "hidden_units": [8]}
MAX_LEN = 8
# Events per user: u_rare falls below --min-user-count 2 (OOV); u_plain has no table row.
EVENTS_PER_USER = {"u_heavy": 12, "u_mid": 6, "u_none": 4, "u_plain": 3, "u_rare": 1}
USERS_JSONL = [
    {"user_id": "u_heavy", "attributes": ["gold", "eu"], "embedding": [0.1, 0.2, 0.3]},  # 1
    {"user_id": "u_mid", "attributes": ["eu"], "embedding": [1.0, 2.0, 3.0]},  # 2
    {"user_id": "u_mid", "attributes": ["eu"], "embedding": [1.0, 2.0, 3.0]},  # 3 identical
    {"user_id": "u_mid", "attributes": ["us"], "embedding": [1.0, 2.0, 3.0]},  # 4 conflicting
    {"attributes": ["x"], "embedding": [1.0, 1.0, 1.0]},  # 5 no user_id
    {"user_id": "u_rare", "attributes": ["silver"], "embedding": [1.0, 2.0]},  # 6 short vector
]
# A second file, CSV (list cells are JSON arrays): a non-finite vector (dropped, the user
# keeps its attribute) and a user with no events.
USERS_CSV = (
    "user_id,attributes,embedding\n"
    'u_none,"[""vip""]","[NaN, 1, 2]"\n'
    'u_table_only,"[""gold""]","[0, 0, 1]"\n'
)


def _write_raw(root) -> dict:
    items = [{"item_id": f"i{i}", "text": "", "attributes": [f"a{i % 3}"]} for i in range(8)]
    events, t = [], 1_000
    for user, n in EVENTS_PER_USER.items():
        for j in range(n):
            t += 10
            events.append({"user_id": user, "timestamp": t, "item_id": f"i{(j * 3) % 8}",
                           "query": "", "label": (j + len(user)) % 2})  # fmt: skip
    paths = {k: str(root / f"{k}.jsonl") for k in ("events", "items", "users")}
    for key, rows in (("events", events), ("items", items), ("users", USERS_JSONL)):
        with open(paths[key], "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    paths["users_csv"] = str(root / "users.csv")
    with open(paths["users_csv"], "w") as f:
        f.write(USERS_CSV)
    return paths


def _preprocess(raw: dict, out: str, *options) -> int:
    from seminar_tf.cli import main

    return main(["preprocess", "--events", raw["events"], "--items", raw["items"], "--out", out,
                 "--max-len", str(MAX_LEN), "--split", "last", *options])  # fmt: skip


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    return _write_raw(tmp_path_factory.mktemp("users-raw"))


@pytest.fixture(scope="module")
def users_data(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("users-table") / "data")
    rc = _preprocess(raw, out, "--users", raw["users"], raw["users_csv"], "--min-user-count", "2")
    assert rc == 0
    return out


def _vocab(data_dir: str, kind: str) -> list:
    with open(os.path.join(data_dir, spec.VOCAB_DIR, spec.VOCAB_FILES[kind])) as f:
        return [line.rstrip("\n") for line in f]


def _tables(data_dir: str) -> dict:
    return training.load_tables(data_dir)


def _stored_users(data_dir: str) -> dict:
    from seminar_tf.data.dataset import example_files, parse_spec

    stored = {}
    for path in example_files(data_dir):
        for record in tf.data.TFRecordDataset(path):
            r = tf.io.parse_single_example(record, parse_spec())
            stored[r["user_id"].numpy().decode()] = int(r["user"])
    return stored


# ------------------------------------------------------------------------- preprocessing
def test_users_table_dead_letters_and_accounting(users_data, raw):
    letters = []
    for path in glob.glob(os.path.join(users_data, spec.REJECTED_DIR, "*.jsonl")):
        with open(path) as f:
            letters += [json.loads(line) for line in f if line.strip()]
    got = sorted(
        (r["reason"].split(":")[0], r["field"], r["dropped"], r["source"])
        for r in letters if r["stage"] == "users"
    )  # fmt: skip
    jsonl, csv = raw["users"], raw["users_csv"]
    assert got == sorted([
        ("conflicting_duplicate", "user_id", "record", f"{jsonl}:line 4"),
        ("identical_duplicate", "user_id", "record", f"{jsonl}:line 3"),
        ("missing_field", "user_id", "record", f"{jsonl}:line 5"),
        ("non_finite_value", "embedding", "field", f"{csv}:line 2"),
        ("wrong_vector_length", "embedding", "field", f"{jsonl}:line 6"),
    ])  # fmt: skip
    conflict = next(r for r in letters if r["reason"].startswith("conflicting"))
    assert "attributes" in conflict["reason"] and f"{jsonl}:line 2" in conflict["reason"]
    with open(os.path.join(users_data, spec.STATS_FILE)) as f:
        stats = json.load(f)
    books = stats["accounting"]["users"]
    assert books == {"input": 8, "used": 5, "rejected": 3, "ok": True}
    assert books["input"] == books["used"] + books["rejected"] and stats["accounting_ok"]
    assert stats["dropped_fields"]["users"] == {"wrong_vector_length": 1, "non_finite_value": 1}
    # u_table_only has no events, u_rare is OOV: their rows index nothing (not an error).
    assert stats["tables"]["table_users_without_id"] == 2
    assert stats["used_events"] == sum(EVENTS_PER_USER.values())


def test_user_side_tables_are_indexed_by_the_user_vocabulary(users_data):
    users = _vocab(users_data, "user")
    assert users == ["u_heavy", "u_mid", "u_none", "u_plain"]  # u_rare: below the minimum
    attrs = _vocab(users_data, "user_attribute")
    assert attrs == ["eu", "gold", "silver", "vip"]  # by count, then value
    ids = {v: i + spec.NUM_RESERVED_IDS for i, v in enumerate(attrs)}
    data_spec = spec.DataSpec.load(users_data)
    assert (data_spec.num_user_attributes, data_spec.max_user_attributes) == (6, 2)
    assert data_spec.user_embedding_dim == 3 and data_spec.user_hash_buckets == 0
    t = _tables(users_data)
    assert t["user_attributes"].shape == (data_spec.num_users, 2)
    row = {u: i + spec.NUM_RESERVED_IDS for i, u in enumerate(users)}
    assert t["user_attributes"][row["u_heavy"]].tolist() == [ids["gold"], ids["eu"]]
    assert t["user_attributes"][row["u_mid"]].tolist() == [ids["eu"], 0]  # first seen kept
    assert t["user_attributes"][row["u_none"]].tolist() == [ids["vip"], 0]
    np.testing.assert_allclose(t["user_vectors"][row["u_mid"]], [1.0, 2.0, 3.0])
    assert t["user_has_vector"].tolist() == [False, False, True, True, False, False]
    # Unknown (0), OOV (1, u_rare's row is not used) and u_plain (no table row): empty.
    for r in (spec.PAD_ID, spec.OOV_ID, row["u_plain"]):
        assert not t["user_attributes"][r].any() and not t["user_vectors"][r].any()
    stored = _stored_users(users_data)
    assert stored == {**row, "u_rare": spec.OOV_ID}


def test_without_users_table_outputs_and_old_specs_stay_as_they_were(tiny):
    data_spec = spec.DataSpec.load(tiny["data"])
    sizes = ("num_user_attributes", "max_user_attributes", "user_embedding_dim")
    assert [getattr(data_spec, s) for s in sizes] == [0, 0, 0]
    assert not set(_tables(tiny["data"])) & set(spec.USER_TABLE_ARRAYS)
    assert _vocab(tiny["data"], "user_attribute") == []
    old = {k: v for k, v in data_spec.to_json().items() if k not in sizes + ("user_hash_buckets",)}
    assert spec.DataSpec.from_json(old) == data_spec
    model = build_model(data_spec, SMALL, _tables(tiny["data"]))
    assert model.user_table_names == () and model.user_vector_projection is None


def test_users_table_with_hashing_or_bad_options_is_refused_in_one_line(raw, tmp_path, capsys):
    for options, message in (
        (["--users", raw["users"], "--user-hash-buckets", "5"], "cannot be combined"),
        (["--min-user-count", "2", "--user-hash-buckets", "5"], "does not apply"),
        (["--users", str(tmp_path / "nowhere.jsonl")], "no such file"),
    ):
        assert _preprocess(raw, str(tmp_path / "out"), *options) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not os.path.exists(tmp_path / "out")


# --------------------------------------------------------------------------- the model
def _features(data_spec, users) -> dict:
    x = testing.make_features(data_spec, len(users), seed=3, min_history=2)
    x["user"] = np.asarray(users, np.int64)
    return x


def test_a_users_attributes_and_vector_change_its_prediction_only(users_data):
    data_spec = spec.DataSpec.load(users_data)
    tables = _tables(users_data)
    model = build_model(data_spec, {**SMALL, "dropout": 0.0}, tables)
    # Embeddings big enough to move the probability clearly.
    model.user_attribute_embeddings.assign(
        np.random.default_rng(0).normal(size=model.user_attribute_embeddings.shape)
    )
    users = [2, 3, 4, 5, spec.OOV_ID, spec.PAD_ID]  # heavy, mid, none, plain, OOV, unknown
    x = _features(data_spec, users)
    before = np.asarray(model(x))
    changed = dict(tables, user_attributes=tables["user_attributes"].copy())
    changed["user_attributes"][3] = [4, 5]  # u_mid: silver, vip instead of eu
    model.set_tables(changed)
    after = np.asarray(model(x))
    assert abs(after[1] - before[1]) > 1e-4  # the check can fail
    np.testing.assert_allclose(np.delete(after, 1), np.delete(before, 1), rtol=1e-6)
    vectors = dict(changed, user_vectors=changed["user_vectors"].copy())
    vectors["user_vectors"][2] *= -50.0  # u_heavy's vector
    vectors["user_vectors"][5] = 9.0  # u_plain: has no vector (flag False): ignored
    model.set_tables(vectors)
    moved = np.asarray(model(x))
    assert abs(moved[0] - after[0]) > 1e-4
    np.testing.assert_allclose(moved[1:], after[1:], rtol=1e-6)


def test_every_preset_has_the_users_table_parts_and_save_load_round_trips(users_data, tmp_path):
    data_spec = spec.DataSpec.load(users_data)
    tables = _tables(users_data)
    x = _features(data_spec, [2, 3, 4, 5, 1, 0])
    for preset in PRESETS:
        model = build_model(data_spec, {**SMALL, "preset": preset}, tables)
        names = {v.path.split("/", 1)[1] for v in model.weights}
        assert {"user_attribute_embeddings", "user_attributes", "user_vectors",
                "user_vector_projection/kernel"} <= names, preset  # fmt: skip
        assert np.asarray(model(x)).shape == (6,)
    model = build_model(data_spec, SMALL, tables)
    config = model.get_config()
    assert (config["num_user_attributes"], config["max_user_attributes"]) == (6, 2)
    assert config["user_embedding_dim"] == 3
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_config() == config
    for name, value in model.get_user_tables().items():
        np.testing.assert_array_equal(loaded.get_user_tables()[name], value)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), rtol=1e-6)
    serving = model.serving_model()  # what the export writes
    np.testing.assert_allclose(np.asarray(serving(x)), np.asarray(model(x)), rtol=1e-5)
    # Without the tower, no users-table part; without the user tables, a clear error.
    off = build_model(data_spec, {**SMALL, "use_user_features": False}, tables)
    assert off.user_table_names == () and not any("user" in v.path for v in off.weights)
    item_only = {k: v for k, v in tables.items() if k not in spec.USER_TABLE_ARRAYS}
    with pytest.raises(ValueError, match="missing `user_attributes`"):
        build_model(data_spec, SMALL, item_only)


@pytest.mark.slow
def test_jax_backend_trains_the_users_table_parts(run_script):
    out = run_script(
        """
        import keras, numpy as np
        from seminar_tf import testing
        from seminar_tf.models import build_model
        ds = testing.make_data_spec(num_user_attributes=7, max_user_attributes=3,
                                    user_embedding_dim=4)
        model = build_model(ds, {"embedding_dim": 8, "num_heads": 2, "top_k": 4,
                                 "hidden_units": [8]}, testing.make_tables(ds))
        model.compile(optimizer="adam", loss="binary_crossentropy")
        x, y = testing.make_batch(ds, 32)
        before = [np.asarray(w).copy() for w in (
            model.user_attribute_embeddings, model.user_vector_projection.kernel)]
        h = model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        assert np.isfinite(h.history["loss"][-1])
        after = (model.user_attribute_embeddings, model.user_vector_projection.kernel)
        assert all(not np.allclose(b, np.asarray(a)) for b, a in zip(before, after))
        print("backend", keras.backend.backend())
        """,
        "jax",
    )
    assert "backend jax" in out


# ---------------------------------------------------------------------- export, serving
def _keras_features(data_dir: str, history: list, candidates: list, user: int) -> dict:
    """The client's request as the Keras model's features (one leading padding slot)."""
    items = {v: i + spec.NUM_RESERVED_IDS for i, v in enumerate(_vocab(data_dir, "item"))}
    data_spec = spec.DataSpec.load(data_dir)
    q, a, n = data_spec.max_query_tokens, data_spec.max_attributes, len(candidates)
    hist = np.array([[0] + [items[h["item_id"]] for h in history]] * n, np.int64)
    return {
        "target_item": np.array([items[c["item_id"]] for c in candidates], np.int64),
        "target_query": np.zeros(n, np.int64), "target_query_tokens": np.zeros((n, q), np.int64),
        "hist_item": hist, "hist_query": np.zeros_like(hist),
        "hist_query_tokens": np.zeros(hist.shape + (q,), np.int64),
        "hist_label": np.array([[0] + [h["label"] for h in history]] * n, np.int64),
        spec.TARGET_ATTRIBUTES.name: np.zeros((n, a), np.int64),
        "user": np.full(n, user, np.int64),
        # what the client sends without given counts: the history's events and clicks, gap 0
        "user_counts": np.array([[len(history), sum(h["label"] for h in history), 0]] * n),
    }  # fmt: skip


def _serve_and_compare(data_dir: str, model, export_dir: str, user_ids: dict) -> dict:
    """Exports ``model``, ranks candidates for each of ``user_ids`` (``{user_id: encoded
    id}``) through the local server and the client, and checks each answer against the
    Keras model fed the encoded id; replays the warmup requests. Returns the answers."""
    from export import writer
    from export.warmup import WARMUP_FILE, read_warmup
    from serving import local_server
    from serving.client import CascadeClient

    writer.export_model(model, data_dir, export_dir, max_len=MAX_LEN, history="all", version=1)
    items = _vocab(data_dir, "item")
    history = [{"item_id": items[i], "label": i % 2} for i in (3, 5, 1)]
    candidates = [{"item_id": items[i]} for i in (0, 2, 4)]
    answers = {}
    with local_server.LocalServer.from_export(export_dir) as server:
        with CascadeClient(server.grpc_target) as client:
            for user_id in user_ids:
                ranked = client.rank_candidates(history, candidates, user_id=user_id)
                answers[user_id] = {r["item_id"]: r["probability"] for r in ranked}
    for user_id, user in user_ids.items():
        expected = np.asarray(model(_keras_features(data_dir, history, candidates, user)))
        got = [answers[user_id][c["item_id"]] for c in candidates]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6, err_msg=user_id)
    for name in spec.SERVING_MODELS:
        version = writer.version_dir(export_dir, name)
        loaded = tf.saved_model.load(version)
        requests = read_warmup(os.path.join(version, "assets.extra", WARMUP_FILE))
        assert requests
        for _, signature, inputs in requests:
            loaded.signatures[signature](**{k: tf.constant(v) for k, v in inputs.items()})
    return answers


def test_export_looks_user_attributes_up_from_user_id_and_serves_them(users_data, tmp_path):
    data_spec = spec.DataSpec.load(users_data)
    tables = _tables(users_data)
    keras.utils.set_random_seed(1)
    model = build_model(data_spec, {**SMALL, "dropout": 0.0}, tables)
    rng = np.random.default_rng(1)
    model.user_attribute_embeddings.assign(rng.normal(size=model.user_attribute_embeddings.shape))
    model.user_embeddings.assign(np.zeros(model.user_embeddings.shape))  # only the table speaks
    user_ids = {"u_heavy": 2, "u_mid": 3, "u_none": 4, "u_plain": 5, "u_rare": spec.OOV_ID,
                "never-seen": spec.OOV_ID, "": spec.PAD_ID}  # fmt: skip
    answers = _serve_and_compare(users_data, model, str(tmp_path / "export"), user_ids)
    # With id embeddings at zero, users differ only through their attributes and vectors:
    # the served answers do (so the SavedModel holds and uses the tables) ...
    assert answers["u_heavy"] != answers["u_mid"] != answers["u_none"] != answers["u_plain"]
    # ... and users without a table row (OOV, no row, unknown) answer alike.
    assert answers["u_rare"] == answers["never-seen"]
    np.testing.assert_allclose(list(answers["u_plain"].values()),
                               list(answers[""].values()), rtol=1e-5)  # fmt: skip


# ------------------------------------------------------------------------------ hashing
def test_user_hash_is_stable():
    """Pinned values: a change of the hash (TensorFlow's farmhash Fingerprint64) would
    re-map every stored user of every hashed preprocessing output."""
    from seminar_tf.user_hash import hash_user_ids

    got = hash_user_ids(["u1", "u_heavy", "", "élan"], 1000)
    assert got.tolist() == [461, 585, spec.PAD_ID, 49]
    assert hash_user_ids(["u1", "u2", "u3"], 7).tolist() == [3, 8, 2]
    with pytest.raises(ValueError):
        hash_user_ids(["u1"], 0)


@pytest.fixture(scope="module")
def hashed_data(raw, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("users-hashed") / "data")
    assert _preprocess(raw, out, "--user-hash-buckets", "5") == 0
    return out


def test_hashed_users_agree_between_preprocessing_and_the_export_graph(hashed_data):
    from export.graph import UserHashLookup, Vocabularies
    from seminar_tf.user_hash import hash_user_ids

    data_spec = spec.DataSpec.load(hashed_data)
    assert data_spec.user_hash_buckets == 5 and data_spec.num_users == 7
    assert _vocab(hashed_data, "user") == []  # no vocabulary is kept
    stored = _stored_users(hashed_data)
    names = sorted(EVENTS_PER_USER)
    assert stored == dict(zip(names, hash_user_ids(names, 5).tolist()))
    assert set(stored.values()) <= set(range(2, 7)) and len(set(stored.values())) > 2
    vocabularies = Vocabularies(hashed_data, users=True)
    assert isinstance(vocabularies.lookups["user"], UserHashLookup)
    assert vocabularies.size("user") == 7
    # The export graph strips the raw id as the preprocessing does, then hashes it.
    from export.graph import strip_text

    raw_ids = tf.constant([f" {n}\t" for n in names] + [""])
    graph_ids = vocabularies.lookup("user", strip_text(raw_ids)).numpy().tolist()
    assert graph_ids == [stored[n] for n in names] + [spec.PAD_ID]


def test_hashed_users_are_hashed_inside_the_served_model(hashed_data, tmp_path):
    from seminar_tf.user_hash import hash_user_ids

    data_spec = spec.DataSpec.load(hashed_data)
    keras.utils.set_random_seed(2)
    model = build_model(data_spec, {**SMALL, "dropout": 0.0}, _tables(hashed_data))
    model.user_embeddings.assign(np.random.default_rng(2).normal(size=model.user_embeddings.shape))
    stored = _stored_users(hashed_data)
    user_ids = {**stored, "never-seen": int(hash_user_ids(["never-seen"], 5)[0]), "": 0}
    answers = _serve_and_compare(hashed_data, model, str(tmp_path / "export"), user_ids)
    assert len({json.dumps(a, sort_keys=True) for a in answers.values()}) > 3
