"""``seminar tune``: a random search of training and model settings, scored on the validation
split only.

Each trial is one :func:`seminar_tf.training.train` run (early stopping on validation AUC,
best epoch's weights kept) with the trial's values on top of a base :class:`TrainConfig`,
scored by its best validation AUC. The test split is never read: training builds only the
train and validation datasets. Every trial trains with the same seed, so trials differ only
in their values, and the values drawn depend only on the seed (KerasTuner's
``RandomSearchOracle``): the same command draws the same trials.

The output directory holds:

| path | what |
| --- | --- |
| ``best.json`` | the best trial's TrainConfig: ``seminar train --config best.json`` |
| ``trials.json`` | the search (preset, seed, space) and a row per trial: values, val AUC, s |
| ``trials.png`` | the validation AUC per trial, the chosen one marked |
| ``search.json`` | the search's settings; a rerun into the same ``--out`` must match them |
| ``trials/<id>/`` | each trial's run directory (``config.json``, ``history.json``); the best |
|  | trial keeps its ``model.keras`` |
| ``kerastuner/`` | KerasTuner's oracle state: a rerun resumes (finished trials are kept) |
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import sys
import time

from seminar_tf import spec
from seminar_tf.train_config import ConfigError, TrainConfig

log = logging.getLogger("seminar.tune")

# The search space, in one place. ``name: (where, sampling, values)``:
# - where: "train" (a TrainConfig field) or "model" (a SeminarCTR setting in ``model``);
# - sampling: "log" / "linear" (uniform between ``values[0]`` and ``values[1]``, log-uniform
#   for "log") or "choice" (one of ``values``, uniformly).
# ``top_k`` (the behaviours the first stage keeps) is searched only for presets with a
# first stage (not ``dnn``, which has no history, nor ``full_attention``, which keeps all),
# and only over values up to the history length (larger ones keep everything, like the
# longest). ``embedding_dim`` is not searched with ``--pretrained``: it is the PSU's.
# ``weight_decay`` is decoupled (AdamW-style; see TrainConfig.weight_decay).
SEARCH_SPACE = {
    "learning_rate": ("train", "log", (1e-4, 3e-3)),
    "weight_decay": ("train", "choice", (0.0, 1e-3, 1e-2, 1e-1)),
    "dropout": ("model", "linear", (0.0, 0.5)),
    "embedding_dim": ("model", "choice", (32, 64, 128)),
    "top_k": ("model", "choice", (16, 32, 64, 128)),
}
OBJECTIVE = "val_auc"

BEST_FILE = "best.json"
TRIALS_FILE = "trials.json"
PLOT_FILE = "trials.png"
SEARCH_FILE = "search.json"
TRIALS_DIR = "trials"
TRIAL_FILE = "trial.json"  # one row of the table, in each trial's run directory
KT_PROJECT = "kerastuner"
DEFAULT_PRESET = "seminar"


def _effective_model(model: dict) -> dict:
    from seminar_tf.models.factory import PRESETS

    return {**PRESETS.get(model.get("preset", DEFAULT_PRESET), {}), **model}


def search_space(model: dict, max_len: int | None = None, pretrained: bool = False) -> dict:
    """The part of :data:`SEARCH_SPACE` that applies to the CTR ``model`` settings (with a
    ``preset``): without ``top_k`` for a model without a first stage, ``top_k`` choices cut to
    ``max_len`` (the history length; the smallest kept), without ``embedding_dim`` when
    restoring a ``pretrained`` PSU."""
    from seminar_tf.models.seminar import NO_SEARCH

    effective = _effective_model(model)
    space = dict(SEARCH_SPACE)
    if not effective.get("use_history", True) or effective.get("search") == NO_SEARCH:
        space.pop("top_k")
    elif max_len:
        where, sampling, values = space["top_k"]
        space["top_k"] = (where, sampling, tuple(v for v in values if v <= max_len) or values[:1])
    if pretrained:
        space.pop("embedding_dim")
    return space


def in_space(name: str, value, space: dict | None = None) -> bool:
    """Whether ``value`` is a value of ``name`` in ``space`` (default :data:`SEARCH_SPACE`)."""
    _, sampling, values = (space or SEARCH_SPACE)[name]
    if sampling == "choice":
        return value in values
    return values[0] <= value <= values[1]


def apply_params(cfg: TrainConfig, params: dict, space: dict | None = None) -> TrainConfig:
    """``cfg`` with the searched ``params`` set: TrainConfig fields and ``model`` settings as
    :data:`SEARCH_SPACE` says (checked again by TrainConfig)."""
    space = space or SEARCH_SPACE
    fields = {k: v for k, v in params.items() if space[k][0] == "train"}
    model = {**cfg.model, **{k: v for k, v in params.items() if space[k][0] == "model"}}
    return TrainConfig(**{**dataclasses.asdict(cfg), **fields, "model": model})


def _hyperparameters(space: dict):
    import keras_tuner as kt

    hp = kt.HyperParameters()
    for name, (_, sampling, values) in space.items():
        if sampling == "choice":
            hp.Choice(name, list(values), ordered=True)
        else:
            hp.Float(name, values[0], values[1], sampling=sampling)
    return hp


def _pretrained_embedding_dim(pretrained: str) -> int:
    """The PSU's ``embedding_dim`` (from its ``config.json``, else the PSU default)."""
    import inspect

    from seminar_tf.models.psu import PSU
    from seminar_tf.training import CONFIG_FILE

    with open(os.path.join(pretrained, CONFIG_FILE)) as f:
        model = json.load(f).get("train", {}).get("model", {})
    default = inspect.signature(PSU.__init__).parameters["embedding_dim"].default
    return int(model.get("embedding_dim", default))


def _fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _auc(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _best(rows: list) -> dict | None:
    """The row with the highest validation AUC (the first of equal ones), None if none has
    one."""
    scored = [r for r in rows if r.get(OBJECTIVE) is not None]
    return max(scored, key=lambda r: r[OBJECTIVE]) if scored else None


class _Tuner:
    """Holds the KerasTuner tuner class (imported on use)."""

    @staticmethod
    def make(**kwargs):
        import keras_tuner as kt

        class Tuner(kt.engine.base_tuner.BaseTuner):
            """Each trial: ``training.train`` on the train split, scored on validation."""

            def __init__(self, run_trial, **kw):
                self._run = run_trial
                self.error = None
                super().__init__(**kw)

            def run_trial(self, trial, *args, **kwargs):
                try:
                    return self._run(trial)
                except Exception as e:  # a bad config or data fails the search, not a trial
                    self.error = e
                    raise kt.errors.FatalError(str(e)) from e

        return Tuner(**kwargs)


def tune(
    data_dir: str,
    out_dir: str,
    base: TrainConfig,
    trials: int,
    pretrained: str | None = None,
) -> dict:
    """Searches :func:`search_space` for ``base``'s model with ``trials`` trials (seeded by
    ``base.seed``), each a :func:`seminar_tf.training.train` run into ``out_dir/trials/<id>``
    scored by its best validation AUC; writes ``best.json`` (``base`` with the best values),
    ``trials.json`` and ``trials.png`` to ``out_dir``. A rerun with the same settings resumes
    (finished trials count toward ``trials``). Returns the ``trials.json`` report.

    Raises ``ValueError`` for ``trials < 1``, a data directory without validation targets, an
    ``out_dir`` holding a search with other settings, or a trial's bad config or data.
    """
    import keras
    import keras_tuner as kt

    from seminar_tf import training

    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got {trials!r}")
    with open(os.path.join(data_dir, spec.STATS_FILE)) as f:
        n_valid = int(json.load(f)["targets_per_split"]["valid"])
    if n_valid == 0:
        raise ValueError(f"{data_dir}: the valid split has no targets; tuning scores on it")
    model = {"preset": DEFAULT_PRESET, **base.model}
    if pretrained:
        model["embedding_dim"] = _pretrained_embedding_dim(pretrained)
    base = dataclasses.replace(base, model=model)
    max_len = base.max_len or spec.DataSpec.load(data_dir).max_len
    space = search_space(model, max_len, pretrained=bool(pretrained))
    settings = {  # as stored (JSON), to compare with a previous run's
        "data_dir": os.path.abspath(data_dir),
        "pretrained": os.path.abspath(pretrained) if pretrained else None,
        "seed": base.seed,
        "objective": OBJECTIVE,
        "space": {k: [w, s, list(v)] for k, (w, s, v) in space.items()},
        "base_config": dataclasses.asdict(base),
    }
    settings = json.loads(json.dumps(settings))
    os.makedirs(out_dir, exist_ok=True)
    _check_settings(out_dir, settings)

    def run_trial(trial):
        params = {k: trial.hyperparameters.get(k) for k in space}
        params = {k: (float(v) if space[k][1] != "choice" else v) for k, v in params.items()}
        cfg = apply_params(base, params, space)
        run_dir = os.path.join(out_dir, TRIALS_DIR, trial.trial_id)
        number = int(trial.trial_id) + 1  # KerasTuner numbers trials from 0
        os.makedirs(run_dir, exist_ok=True)
        keras.backend.clear_session()
        t0 = time.time()
        _, history = training.train(data_dir, run_dir, cfg, pretrained=pretrained)
        seconds = time.time() - t0
        aucs = [float(v) for v in history.get(OBJECTIVE, [])]
        score = max(aucs) if aucs and not any(map(math.isnan, aucs)) else None
        row = {
            "trial": number,
            "id": trial.trial_id,
            "params": params,
            OBJECTIVE: score,
            "best_epoch": aucs.index(score) + 1 if score is not None else None,
            "epochs_run": len(history.get("loss", [])),
            "seconds": round(seconds, 1),
        }
        _write_json(os.path.join(run_dir, TRIAL_FILE), row)
        rows = _rows(out_dir, tuner)
        best = _best(rows)
        log.info(
            "tune: trial %d/%d %s: val AUC %s (best epoch %s of %d) in %.1fs; best so far "
            "%s (trial %s)",
            number, trials, " ".join(f"{k}={_fmt(v)}" for k, v in params.items()),
            _auc(score), row["best_epoch"], row["epochs_run"], seconds,
            _auc(best[OBJECTIVE] if best else None), best["trial"] if best else "-",
        )  # fmt: skip
        return 0.0 if score is None else score

    oracle = kt.oracles.RandomSearchOracle(
        objective=kt.Objective(OBJECTIVE, "max"),
        max_trials=trials,
        seed=base.seed,
        hyperparameters=_hyperparameters(space),
        tune_new_entries=False,
        max_retries_per_trial=0,
    )
    with contextlib.redirect_stdout(sys.stderr):  # KerasTuner prints "Reloading ..."
        tuner = _Tuner.make(
            run_trial=run_trial, oracle=oracle, directory=out_dir, project_name=KT_PROJECT
        )
    done = len(tuner.oracle.trials)
    log.info(
        "tune: %d trial(s) of %s over %s on %s%s",
        trials, model["preset"], ", ".join(space), data_dir,
        f" (resuming after {done})" if done else "",
    )  # fmt: skip
    try:
        tuner.search(verbose=0)
    except kt.errors.FatalError:
        if tuner.error is not None:
            raise tuner.error from None
        raise
    rows = _rows(out_dir, tuner)
    best = _best(rows)
    if best is None:
        raise ValueError(f"tune: no trial produced a validation AUC (see {out_dir}/{TRIALS_DIR})")
    best_cfg = apply_params(base, best["params"], space)
    _write_json(os.path.join(out_dir, BEST_FILE), dataclasses.asdict(best_cfg))
    report = {
        **settings,
        "trials_requested": trials,
        "best_trial": best["trial"],
        "best_" + OBJECTIVE: best[OBJECTIVE],
        "best_params": best["params"],
        "best_config": BEST_FILE,
        "best_model": os.path.join(TRIALS_DIR, best["id"]),
        "trials": rows,
    }
    _write_json(os.path.join(out_dir, TRIALS_FILE), report)
    plot_trials(rows, best, os.path.join(out_dir, PLOT_FILE))
    for row in rows:  # trial models take room; the best one is kept
        path = os.path.join(out_dir, TRIALS_DIR, row["id"], training.MODEL_FILE)
        if row is not best and os.path.exists(path):
            os.remove(path)
    return report


def _rows(out_dir: str, tuner) -> list:
    """The finished trials' rows, in the order they ran."""
    rows = []
    for trial_id in sorted(tuner.oracle.trials):
        path = os.path.join(out_dir, TRIALS_DIR, trial_id, TRIAL_FILE)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
    return sorted(rows, key=lambda r: r["trial"])


def _check_settings(out_dir: str, settings: dict) -> None:
    path = os.path.join(out_dir, SEARCH_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        differ = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differ:
            raise ConfigError(
                f"{out_dir} holds a search with other settings (differs in: "
                f"{', '.join(differ)}); use another --out or remove it"
            )
    else:
        _write_json(path, settings)


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def plot_trials(rows: list, best: dict | None, path: str) -> None:
    """A PNG of the validation AUC per trial, the chosen trial in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [r for r in rows if r.get(OBJECTIVE) is not None]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * len(rows) + 2), 3.2))
    colors = ["#dd8452" if r is best else "#4c72b0" for r in scored]
    ax.bar([str(r["trial"]) for r in scored], [r[OBJECTIVE] for r in scored], color=colors)
    if scored:
        lo, hi = min(r[OBJECTIVE] for r in scored), max(r[OBJECTIVE] for r in scored)
        ax.set_ylim(max(0.0, lo - 0.05 * max(hi - lo, 0.02) - 0.01), hi + 0.01)
    ax.set_xlabel("trial")
    ax.set_ylabel("best validation AUC")
    if best:
        ax.set_title(f"best: trial {best['trial']} ({best[OBJECTIVE]:.4f})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
