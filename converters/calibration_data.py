"""Calibration token sets (../shared/spec/qoq-algorithm.md §4): documents → token windows → fixed-length chunks.

Sources: text files (each blank-line-separated paragraph is a document), `"pydoc"` (the English documentation
topics CPython ships in `pydoc_data`, available offline everywhere: the CPU and test default), or a
`datasets` name (`"pileval"`, `"wikitext"`) when that library and the data are available.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

RECIPE_SAMPLES, RECIPE_SEQ_LEN = 128, 1024
"""The reference recipe's calibration set: 128 × 1024 tokens (pile-val)."""

CPU_SAMPLES, CPU_SEQ_LEN = 32, 512
"""The smaller default used on CPU, where the recipe's set would take most of an hour per model."""

_DATASETS = {
    "pileval": ("mit-han-lab/pile-val-backup", None, "validation", "text"),
    "wikitext": ("wikitext", "wikitext-2-raw-v1", "train", "text"),
}


def default_calibration_size() -> tuple[int, int]:
    """(samples, sequence length): the recipe's on an accelerator, the smaller CPU set otherwise."""
    import jax

    return (CPU_SAMPLES, CPU_SEQ_LEN) if jax.default_backend() == "cpu" else (RECIPE_SAMPLES, RECIPE_SEQ_LEN)


def calibration_tokens(
    tokenizer,
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    num_samples: int,
    seq_len: int,
    seed: int = 42,
) -> np.ndarray:
    """[num_samples, seq_len] int32 token ids built the reference's way: shuffle the documents (seed 42),
    encode each (with the tokenizer's BOS), take a random seq_len window of long ones, stop once there are
    enough documents and tokens, concatenate and cut into chunks. Raises ValueError when the source is too
    short for even one chunk; returns fewer samples (never padded ones) when it has fewer."""
    documents = list(_documents(source))
    random.Random(seed).shuffle(documents)
    windows = random.Random(seed)
    pieces, total = [], 0
    for text in documents:
        ids = tokenizer.encode(text.strip())
        if not ids:
            continue
        if len(ids) > seq_len:
            start = windows.randint(0, len(ids) - seq_len)
            ids = ids[start : start + seq_len]
        pieces.append(ids)
        total += len(ids)
        if len(pieces) >= num_samples and total >= num_samples * seq_len:
            break
    flat = np.fromiter((t for ids in pieces for t in ids), dtype=np.int32)
    count = min(num_samples, len(flat) // seq_len)
    if count == 0:
        raise ValueError(f"calibration source {source!r} has {len(flat)} tokens, fewer than one {seq_len}-token sample")
    return flat[: count * seq_len].reshape(count, seq_len)


def _documents(source) -> Iterable[str]:
    if isinstance(source, (list, tuple)):
        for item in source:
            yield from _documents(item)
        return
    name = os.fspath(source)
    if name == "pydoc":
        from pydoc_data.topics import topics

        yield from (topics[key] for key in sorted(topics))
    elif name in _DATASETS and not Path(name).exists():
        yield from _dataset_documents(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise ValueError(
                f"calibration source {name!r} is neither a text file nor one of pydoc, {', '.join(_DATASETS)}"
            )
        yield from (p for p in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")) if p.strip())


def _dataset_documents(name: str) -> Iterable[str]:
    try:
        import datasets
    except ImportError as error:
        raise ValueError(f"calibration set {name!r} needs the `datasets` library (pip install datasets)") from error
    path, config, split, field = _DATASETS[name]
    try:
        rows = datasets.load_dataset(path, config, split=split)
    except Exception as error:  # offline, missing data: say which and how to avoid it
        raise ValueError(f"could not load calibration set {name!r} ({error}); pass a text file instead") from error
    return (row[field] for row in rows)
