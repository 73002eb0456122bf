"""Hugging Face ``datasets`` as a source (optional extra; imported only when asked for)."""

from __future__ import annotations

import os
import zlib

from ..configs import ConfigError

__all__ = ["hf_documents"]


def hf_documents(path: str, split: str, text_field: str, val_fraction: float,
                 max_files: int | None = None) -> tuple[list[str], list[str]]:
    """Training and validation documents, split by a hash of the row index (deterministic).

    ``path`` is a dataset saved with ``save_to_disk`` or a name ``datasets.load_dataset`` can open offline.
    ``max_files`` limits the number of rows read.
    """
    try:
        import datasets
    except ImportError:
        raise ConfigError("data.source=hf needs the datasets package: pip install datasets") from None
    try:
        saved = ("state.json", "dataset_dict.json")  # what save_to_disk writes
        if os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in saved):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=split)
    except Exception as e:  # noqa: BLE001  (datasets raises many kinds; all mean "cannot open")
        raise ConfigError(f"cannot open dataset {path!r} ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise ConfigError(f"data.hf_split={split!r} not in dataset {path!r}; available: {list(ds)}")
        ds = ds[split]
    else:  # one saved split: hf_split must name it, not be silently ignored
        own = str(ds.split) if ds.split is not None else None
        if split != (own or "train"):
            raise ConfigError(f"data.hf_split={split!r} but {path!r} is a single saved split "
                              f"({own or 'unnamed'}); drop --data.hf_split or save a DatasetDict with that split")
    if text_field not in ds.column_names:
        raise ConfigError(f"data.hf_text_field={text_field!r} is not a column of {path!r}; "
                          f"columns: {ds.column_names}")
    rows = ds[text_field] if max_files is None else ds.select(range(min(max_files, len(ds))))[text_field]
    threshold = round(val_fraction * 10_000)
    train: list[str] = []
    val: list[str] = []
    for i, text in enumerate(rows):
        if not isinstance(text, str):
            raise ConfigError(f"row {i} of column {text_field!r} in {path!r} is a {type(text).__name__}, not text; "
                              f"choose a text column with --data.hf_text_field")
        (val if zlib.crc32(str(i).encode()) % 10_000 < threshold else train).append(text)
    if not val and len(train) > 1:
        val.append(train.pop())
    return train, val
