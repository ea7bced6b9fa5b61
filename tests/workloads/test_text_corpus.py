"""The text corpus cache: built once with `datasets`, read back with pyarrow alone (no `datasets` import
in a trial's start-up), the same bytes either way."""

import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np

from workloads.common.text import VAL_FRACTION, load_text_corpus, read_saved_dataset


def test_corpus_cache_reads_back_what_datasets_wrote(tmp_path):
    first = load_text_corpus("bbc_news", cache_dir=tmp_path)  # builds the cache
    cache = tmp_path / "text-bbc_news"
    expected = datasets.load_from_disk(str(cache)).data.table
    assert read_saved_dataset(cache).equals(expected)
    again = load_text_corpus("bbc_news", cache_dir=tmp_path)  # reads it
    assert again.sha256 == first.sha256
    np.testing.assert_array_equal(again.train, first.train)
    np.testing.assert_array_equal(again.val, first.val)
    total = len(first.train) + len(first.val)
    assert abs(len(first.val) / total - VAL_FRACTION) < 1e-3


def test_reading_the_cache_does_not_import_datasets(tmp_path):
    load_text_corpus("bbc_news", cache_dir=tmp_path)
    code = ("import sys; from pathlib import Path; from workloads.common.text import load_text_corpus; "
            f"c = load_text_corpus('bbc_news', cache_dir=Path({str(tmp_path)!r})); "
            "assert len(c.train) > 0; print('datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "False", out.stderr
