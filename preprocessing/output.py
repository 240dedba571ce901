"""Atomic output directories: a run writes into ``OUT.tmp-<run_id>`` and becomes ``OUT`` only
when it succeeded.

Life of a run: :func:`prepare_output` refuses an existing ``OUT`` (unless ``overwrite``) and
picks the temporary sibling; the graph writes there; :func:`commit` lists every file with its
size into ``_MANIFEST.json`` (written last) and renames the directory into place (an old
``OUT`` is moved aside first and deleted after). A failed job's directory is kept as
``OUT.failed-<run_id>`` (:func:`keep_failed`) for its dead letters and stats; a killed job
leaves ``OUT.tmp-<run_id>``. Neither is ever taken for an output: ``verify_output`` refuses
both names, and neither is at ``OUT``.

This is the launcher's local finalisation, not part of the graph: local paths use
``os.replace`` (atomic on one filesystem), others go through Beam's ``FileSystems``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import secrets
import shutil

from apache_beam.io.filesystems import FileSystems

from seminar_tf.data.manifest import FAILED_MARK, MANIFEST_FILE, TMP_MARK, build_manifest
from seminar_tf.data.readers import DataError

log = logging.getLogger("seminar.preprocess")


@dataclasses.dataclass(frozen=True)
class OutputLayout:
    """Where one run writes (``tmp``) and where it lands (``out``)."""

    out: str
    tmp: str
    run_id: str
    overwrite: bool


def _is_local(path: str) -> bool:
    return "://" not in path


def new_run_id() -> str:
    """A sortable, unique id: UTC time plus random hex."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{now}-{secrets.token_hex(4)}"


def check_output(out: str, overwrite: bool = False) -> str:
    """Raises DataError (one line) unless a run may write ``out``; returns it normalised."""
    out = out.rstrip("/") or out
    base = os.path.basename(out)
    if TMP_MARK in base or FAILED_MARK in base:
        raise DataError(f"--out {out}: names with {TMP_MARK!r} or {FAILED_MARK!r} are reserved")
    if _is_local(out):
        if os.path.exists(out) and not os.path.isdir(out):
            raise DataError(f"--out {out}: exists and is a file, not a directory")
        exists = os.path.isdir(out)
    else:
        exists = FileSystems.exists(out) or FileSystems.exists(out + "/")
    if exists and not overwrite:
        raise DataError(
            f"--out {out}: already exists; pass --overwrite to replace it (replaced only "
            "after the new run succeeds)"
        )
    return out


def prepare_output(out: str, overwrite: bool = False) -> OutputLayout:
    """Checks ``out`` and returns the layout of a new run; raises DataError (one line)."""
    out = check_output(out, overwrite)
    run_id = new_run_id()
    tmp = f"{out}{TMP_MARK}{run_id}"
    if _is_local(tmp):
        os.makedirs(tmp)
    return OutputLayout(out=out, tmp=tmp, run_id=run_id, overwrite=overwrite)


def list_files(root: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``root`` (``/``-separated)."""
    sizes = {}
    if _is_local(root):
        for dirpath, _, names in os.walk(root):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                sizes[rel] = os.path.getsize(full)
        return sizes
    prefix = root.rstrip("/") + "/"
    for meta in FileSystems.match([prefix + "**"])[0].metadata_list:
        sizes[meta.path[len(prefix) :]] = meta.size_in_bytes
    return sizes


def _move(src: str, dst: str) -> None:
    if _is_local(src):
        os.replace(src, dst)
        return
    files = list_files(src)
    FileSystems.rename([f"{src}/{rel}" for rel in files], [f"{dst}/{rel}" for rel in files])


def _delete(path: str) -> None:
    if _is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    elif FileSystems.exists(path + "/") or FileSystems.exists(path):
        FileSystems.delete([path + "/"])


def discard(layout: OutputLayout) -> None:
    """Removes a run's temporary directory (best effort: after an exception)."""
    try:
        _delete(layout.tmp)
    except Exception as e:  # noqa: BLE001 - cleanup must not hide the original error
        log.warning("could not remove %s: %s", layout.tmp, e)


def keep_failed(layout: OutputLayout) -> str:
    """Renames a failed run's directory to ``OUT.failed-<run_id>``; returns that path."""
    failed = f"{layout.out}{FAILED_MARK}{layout.run_id}"
    _move(layout.tmp, failed)
    return failed


def commit(layout: OutputLayout) -> dict:
    """Writes the manifest (last file of the run) and moves the run to ``OUT``."""
    sizes = list_files(layout.tmp)
    sizes.pop(MANIFEST_FILE, None)
    manifest = build_manifest(layout.run_id, sizes)
    path = FileSystems.join(layout.tmp, MANIFEST_FILE)
    with FileSystems.create(path) as f:
        f.write(json.dumps(manifest, indent=1, sort_keys=True).encode("utf-8"))
    old = None
    if layout.overwrite and (
        os.path.isdir(layout.out) if _is_local(layout.out) else FileSystems.exists(layout.out + "/")
    ):
        # Aside under a reserved name: if the process dies between the two moves, OUT is
        # absent (never mixed) and the old run is recognisably not an output.
        old = f"{layout.out}{TMP_MARK}{layout.run_id}-replaced"
        _move(layout.out, old)
    _move(layout.tmp, layout.out)
    if old is not None:
        _delete(old)
    return manifest
