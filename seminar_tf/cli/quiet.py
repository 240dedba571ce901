"""Quiet by default: our stage lines only; ``-v`` brings back the libraries' logs
(TensorFlow's C++ start-up lines, Beam, faiss, apitools) and tracebacks."""

from __future__ import annotations

import contextlib
import logging
import os
import sys

log = logging.getLogger("seminar")

_QUIET_LOGGERS = {  # third-party loggers and the level they keep when not -v
    "apache_beam": logging.WARNING,
    "apache_beam.runners.portability.local_job_service": logging.ERROR,
    "apitools": logging.ERROR,
    "google.auth": logging.ERROR,
    "google_auth_httplib2": logging.ERROR,
    "oauth2client": logging.ERROR,
    "faiss": logging.ERROR,
    "absl": logging.WARNING,
    "tensorflow": logging.ERROR,
}
_QUIET_WARNINGS = r"(keras|tensorflow|tf_keras|apache_beam|google|absl|faiss|pyarrow|sklearn)(\.|$)"


@contextlib.contextmanager
def _stderr_fd_to_devnull():
    """Points file descriptor 2 at /dev/null (C++ logs) for the block; Python's sys.stderr
    writes there too, so nothing of ours may be logged inside."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _QuietLoader:
    """Runs a module's loader with fd 2 on /dev/null: TensorFlow's shared libraries log a
    few lines at load time (oneDNN, CUDA stubs), before TF_CPP_MIN_LOG_LEVEL is applied."""

    def __init__(self, inner, finder):
        self._inner, self._finder = inner, finder

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self._finder)  # once: the import is happening
        module.__loader__ = module.__spec__.loader = self._inner
        with _stderr_fd_to_devnull():
            self._inner.exec_module(module)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _QuietTensorFlowImport:
    """A ``sys.meta_path`` finder: the first ``import tensorflow`` (wherever it happens, if it
    happens) loads with C++ start-up logging discarded; then the finder removes itself."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader, self)
        return spec


class _LibraryFilter(logging.Filter):
    """Drops third-party messages logged on the root logger (``logging.warning(...)`` at
    import time, e.g. Beam's "apitools not found") below ERROR."""

    def filter(self, record):
        return record.name != "root" or record.levelno >= logging.ERROR


def setup_logging(verbose: bool) -> None:
    """Logging and library noise: our ``seminar.*`` stage lines at INFO and the libraries'
    warnings; with ``verbose``, everything at DEBUG (Beam at INFO) and TensorFlow's C++ logs
    as TensorFlow's environment sets them."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    if verbose:
        for noisy in ("apache_beam", "urllib3", "matplotlib", "h5py", "PIL"):
            logging.getLogger(noisy).setLevel(logging.INFO)
        return
    # Set before TensorFlow is imported (nothing imports it before main runs): 3 drops the
    # C++ INFO/WARNING/ERROR lines, e.g. "failed call to cuInit ... (303)" on a machine without
    # a GPU and oneDNN's int64 fallback note. A value the user set is kept.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules and not any(
        isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _QuietTensorFlowImport())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_LibraryFilter())
    for name, level in _QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    import warnings

    warnings.filterwarnings("ignore", module=_QUIET_WARNINGS)
