"""ScaNN's anisotropic quantization (AH) of GSU keys, for ``pq_recall.py``'s ScaNN rows.

ScaNN's TensorFlow op does not load beside this project's TensorFlow, and ``import scann``
loads it whenever TensorFlow is importable, so ``pq_recall.py`` runs this script in its own
process with TensorFlow hidden: it reads ``train`` (keys to learn from) and ``encode``
(keys to code) from an ``.npz``, builds a brute-force AH searcher on both (ScaNN learns its
codebooks from a sample of the database it indexes, so up to the share of ``encode`` rows in
it can come from them; ``pq_recall`` reports that share), and writes each ``encode`` row's
reconstruction (the AH centers of its codes) to the output ``.npz``.

    python benchmarks/scann_codes.py IN.npz OUT.npz --dims-per-block 2 --hash lut16
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.modules["tensorflow"] = None  # type: ignore[assignment]  (see the docstring)

import numpy as np  # noqa: E402


def reconstruct(directory: str, rows: slice) -> np.ndarray:
    """The AH reconstruction ``[N, d]`` of the database rows ``rows`` of a serialized
    searcher: each block's center for its code, blocks concatenated."""
    from scann.proto import centers_pb2

    book = centers_pb2.CentersForAllSubspaces()
    with open(os.path.join(directory, "ah_codebook.pb"), "rb") as f:
        book.ParseFromString(f.read())
    centers = [
        np.array([list(c.feature_value_float) for c in sub.center], np.float32)
        for sub in book.subspace_centers
    ]
    codes = np.load(os.path.join(directory, "hashed_dataset.npy"))[rows]
    return np.concatenate([centers[j][codes[:, j]] for j in range(len(centers))], axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs")
    ap.add_argument("output")
    ap.add_argument("--dims-per-block", type=int, default=2)
    ap.add_argument("--hash", choices=("lut16", "lut256"), default="lut16")
    ap.add_argument("--threshold", type=float, default=0.2, help="anisotropic threshold (T)")
    args = ap.parse_args(argv)
    import scann

    data = np.load(args.inputs)
    train, encode = data["train"].astype(np.float32), data["encode"].astype(np.float32)
    db = np.concatenate([train, encode])
    builder = scann.scann_ops_pybind.builder(db, 10, "dot_product")
    searcher = builder.score_ah(
        args.dims_per_block, anisotropic_quantization_threshold=args.threshold,
        training_sample_size=len(db), hash_type=args.hash,
    ).build()  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        searcher.serialize(tmp)
        rebuilt = reconstruct(tmp, slice(len(train), len(db)))
    np.savez(args.output, rebuilt=rebuilt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
