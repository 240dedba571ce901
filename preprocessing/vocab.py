"""Vocabularies: counted in Beam, cut at a min-count, ordered by (-count, value).

Ids follow ``seminar_tf.spec``: entry ``i`` of a vocabulary gets id ``i + 2`` (0 padding,
1 OOV). The files (one value per line) are what ``keras.layers.StringLookup`` reads, in the
model and, later, inside the exported SavedModels.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from preprocessing.rules import has_line_break
from seminar_tf.spec import NUM_RESERVED_IDS, VOCAB_DIR, VOCAB_FILES

VOCAB_KINDS = tuple(VOCAB_FILES)


def order_vocabulary(counted: list, min_counts: dict[str, int]) -> dict[str, list[str]]:
    """``[((kind, value), count)]`` -> ``{kind: [values, most frequent first]}``."""
    by_kind: dict[str, list[tuple[int, str]]] = {kind: [] for kind in VOCAB_KINDS}
    for (kind, value), count in counted:
        if count >= min_counts.get(kind, 1) and value not in ("",):
            by_kind[kind].append((-count, value))
    return {kind: [value for _, value in sorted(pairs)] for kind, pairs in by_kind.items()}


def lookup_table(values: list[str]) -> dict[str, int]:
    return {value: i + NUM_RESERVED_IDS for i, value in enumerate(values)}


class BuildVocabularies(beam.PTransform):
    """``((kind, value), count)`` partial counts -> one ``{kind: [values]}`` element."""

    def __init__(self, min_counts: dict[str, int]):
        super().__init__()
        self._min_counts = dict(min_counts)

    def expand(self, counts):
        min_counts = self._min_counts
        return (
            counts
            | "SumCounts" >> beam.CombinePerKey(sum)
            | "CollectCounts" >> beam.combiners.ToList()
            | "Order" >> beam.Map(order_vocabulary, min_counts)
        )


class _WriteVocabularyFiles(beam.DoFn):
    def __init__(self, out_dir: str):
        self._out_dir = out_dir

    def process(self, vocabs):
        for kind, values in vocabs.items():
            path = FileSystems.join(self._out_dir, VOCAB_DIR, VOCAB_FILES[kind])
            broken = [v for v in values if has_line_break(v)]
            if broken:
                # Validation rejects such ids and normalisation collapses such queries; a value
                # reaching this point would shift every later id of the file by a line.
                raise ValueError(f"vocabulary {kind}: value with a line break: {broken[0]!r}")
            with FileSystems.create(path) as f:
                f.write("".join(v + "\n" for v in values).encode("utf-8"))
            yield path


class WriteVocabularies(beam.PTransform):
    """Writes ``OUT/vocab/<kind>.txt`` files, one value per line."""

    def __init__(self, out_dir: str):
        super().__init__()
        self._out_dir = out_dir

    def expand(self, vocabs):
        return vocabs | "WriteFiles" >> beam.ParDo(_WriteVocabularyFiles(self._out_dir))
