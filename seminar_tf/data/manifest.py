"""The manifest of a ``seminar preprocess`` output, and the check that an output is whole.

``seminar preprocess`` writes into a temporary sibling directory and renames it into place
only when the job succeeded; the last file it writes there is ``_MANIFEST.json``: the run id
and every file's relative path and size. ``schema.json`` and ``stats.json`` carry the same run
id. :func:`verify_output` checks all of it before a data directory is used, so an output that
mixes two runs (old shards next to new vocabularies), lost a file, or never finished is
refused with one line instead of training on it.

Pure Python on purpose (no TensorFlow, no Beam): the training machine may have neither.
"""

from __future__ import annotations

import json
import os

from seminar_tf import spec
from seminar_tf.data.readers import DataError

MANIFEST_FILE = "_MANIFEST.json"
MANIFEST_VERSION = 1
# Sibling directories a run leaves beside OUT: unfinished (killed) and failed runs.
TMP_MARK = ".tmp-"
FAILED_MARK = ".failed-"
# Folders whose every file must be listed: a stray example shard would be read by the
# tf.data reader (it globs examples/*.tfrecord), a stray vocabulary is a sign of mixing.
CHECKED_DIRS = (spec.EXAMPLES_DIR, spec.VOCAB_DIR)


def build_manifest(run_id: str, sizes: dict[str, int]) -> dict:
    """The manifest object for ``{relative path: size in bytes}`` (``/``-separated paths)."""
    return {
        "format_version": MANIFEST_VERSION,
        "run_id": run_id,
        "files": {path: int(size) for path, size in sorted(sizes.items())},
    }


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot read the {what} ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: the {what} is not a JSON object")
    return obj


def verify_output(data_dir: str) -> dict:
    """Raises :class:`DataError` (one line) unless ``data_dir`` is one complete preprocess run.

    Checks: the manifest exists; every listed file exists with its listed size; no unlisted
    file sits in ``examples/`` or ``vocab/``; ``schema.json`` and ``stats.json`` carry the
    manifest's run id. Returns the manifest.
    """
    base = os.path.basename(os.path.normpath(data_dir))
    for mark, what in ((TMP_MARK, "an unfinished"), (FAILED_MARK, "a failed")):
        if mark in base:
            raise DataError(
                f"{data_dir}: {what} `seminar preprocess` run's directory, not an output"
            )
    if not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: no such directory")
    path = os.path.join(data_dir, MANIFEST_FILE)
    if not os.path.exists(path):
        raise DataError(
            f"{data_dir}: no {MANIFEST_FILE} (not a complete `seminar preprocess` output, or "
            "one written before manifests existed); rerun seminar preprocess"
        )
    manifest = _load_json(path, "manifest")
    run_id = manifest.get("run_id")
    files = manifest.get("files")
    if not isinstance(run_id, str) or not isinstance(files, dict):
        raise DataError(f"{path}: the manifest has no run_id or no files list")
    for rel, size in sorted(files.items()):
        full = os.path.join(data_dir, *rel.split("/"))
        if not os.path.isfile(full):
            raise DataError(f"{data_dir}: {rel} is listed in {MANIFEST_FILE} but missing")
        actual = os.path.getsize(full)
        if actual != size:
            raise DataError(
                f"{data_dir}: {rel} has {actual} bytes, {MANIFEST_FILE} of run {run_id} says "
                f"{size} (changed or mixed with another run)"
            )
    for folder in CHECKED_DIRS:
        root = os.path.join(data_dir, folder)
        if not os.path.isdir(root):
            continue
        for dirpath, _, names in os.walk(root):
            for name in sorted(names):
                rel = os.path.relpath(os.path.join(dirpath, name), data_dir).replace(os.sep, "/")
                if rel not in files:
                    raise DataError(
                        f"{data_dir}: {rel} is not in {MANIFEST_FILE} of run {run_id} (left "
                        "from another run?); rerun seminar preprocess into a new directory"
                    )
    for name in (spec.SCHEMA_FILE, spec.STATS_FILE):
        if name not in files:
            raise DataError(f"{data_dir}: {MANIFEST_FILE} does not list {name}")
        other = _load_json(os.path.join(data_dir, name), name).get("run_id")
        if other != run_id:
            raise DataError(
                f"{data_dir}: {name} is from run {other}, {MANIFEST_FILE} from run {run_id}"
            )
    return manifest
