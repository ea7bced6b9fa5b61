"""Trivial floors (workloads.contract.Floor): each workload's on its validation split, in its metric's units."""

import math
import subprocess
import sys

import numpy as np
import pytest

from workloads.common.images import ImageSplits
from workloads.common.text import Corpus
from workloads.contract import MODES, WORKLOADS, Floor, get
from workloads.mqar.task import IGNORE, MQARData, mqar_batch

pytestmark = pytest.mark.usefixtures("data_cache")  # tests/workloads/conftest.py


def lm_floors(text: bytes) -> dict[str, float]:
    """The lm task's floors on `text` as its validation split (the function the workload itself calls)."""
    from workloads.lm import WORKLOAD, build_task

    task, _ = build_task(WORKLOAD.config(smoke=True, overrides={"data": {"seq_len": 2}}))
    ids = np.frombuffer(text, dtype=np.uint8)
    task.__dict__["corpus"] = Corpus("hand", "0" * 64, train=ids, val=ids)
    return {f.name: f.value for f in task.floors()}


def test_lm_floors_of_hand_made_texts():
    # "aaba": p(a) = 3/4, p(b) = 1/4, so H = 3/4 log2(4/3) + 1/4 log2(4) = 0.75 * 0.4150375 + 0.5.
    # Its pairs aa, ab, ba: after "a" (2 of 3 pairs) "a" or "b" equally, 1 bit; after "b" always "a", 0 bits:
    # H(X_t | X_t-1) = 2/3 * 1 + 1/3 * 0.
    assert lm_floors(b"aaba") == pytest.approx({"bigram": 2 / 3, "unigram": 0.8112781}, abs=1e-7)
    # "aab": H = log2(3) - 2/3 = 1.5849625 - 0.6666667; pairs aa, ab: after "a", "a" or "b": 1 bit.
    assert lm_floors(b"aab") == pytest.approx({"bigram": 1.0, "unigram": 0.9182958}, abs=1e-7)
    # "abab...": two equally frequent letters, 1 bit; each determined by the one before, 0 bits.
    assert lm_floors(b"ab" * 50) == pytest.approx({"bigram": 0.0, "unigram": 1.0}, abs=1e-12)


def test_mqar_chance_matches_its_generator():
    from workloads.mqar import WORKLOAD, build_task

    task, _ = build_task(WORKLOAD.config(smoke=True))  # 4 pairs, 32 tokens: values are tokens 16..31
    floors = {f.name: f.value for f in task.floors()}
    assert floors == {"recall_chance": 1 / 4, "value_chance": 1 / 16}
    # Every answer is one of its row's 4 values shown in the context, and a guess among them scores 1/4.
    data = MQARData(seq_len=32, num_kv_pairs=4, vocab_size=32)
    rng = np.random.default_rng(0)
    x, y = mqar_batch(data, 2000, rng)
    context_values = x[:, 1:8:2]
    rows, cols = np.nonzero(y != IGNORE)
    assert len(rows) == 2000 * 4 and (y[rows, cols] >= 16).all() and (y[rows, cols] < 32).all()
    assert (y[rows, cols][:, None] == context_values[rows]).any(1).all()
    guesses = context_values[rows, rng.integers(0, 4, size=len(rows))]
    assert (guesses == y[rows, cols]).mean() == pytest.approx(1 / 4, abs=0.02)  # 8000 queries: SE 0.005


def test_majority_class_on_a_tiny_labelled_set():
    from workloads.image import WORKLOAD, build_task

    task, _ = build_task(WORKLOAD.config(smoke=True, overrides={"data": {"eval_examples": 5}}))
    images = np.zeros((7, 8, 8), np.uint8)
    labels = np.array([3, 1, 3, 0, 3, 9, 9])  # the first 5 are evaluated: class 3 is 3 of them
    task.__dict__["images"] = ImageSplits("tiny", "plain", "0" * 64, 10, images, labels, images, labels)
    [floor] = task.floors()
    # 5 images are too few for the 0.05 minimum: two standard errors, 2 * sqrt(0.6 * 0.4 / 5) = 2 * 0.2190890.
    assert (floor.name, floor.value, floor.margin) == ("majority_class", 0.6, pytest.approx(0.4381780))


def test_cleared_by_more_than_the_margin_in_both_modes():
    bpc = Floor("bigram", 3.58, 0.1, "bpc", "predicting each character from the previous one alone")
    assert bpc.cleared(3.47, "min") and not bpc.cleared(3.49, "min") and not bpc.cleared(3.7, "min")
    acc = Floor("recall_chance", 0.125, 0.05, "accuracy", "guessing")
    assert acc.cleared(0.18, "max") and not acc.cleared(0.17, "max") and not acc.cleared(0.1, "max")
    assert not bpc.cleared(math.nan, "min") and not acc.cleared(math.nan, "max")
    with pytest.raises(ValueError, match="mode: got 'lower'"):
        acc.cleared(0.5, "lower")


@pytest.mark.parametrize(("field", "value", "message"), [
    ("name", "Bigram entropy", "Floor.name"), ("value", math.inf, "Floor.value"),
    ("margin", -0.1, "Floor.margin"), ("value", "3.5", "Floor.value")])
def test_a_floor_checks_itself(field, value, message):
    fields = {"name": "bigram", "value": 3.5, "margin": 0.1, "unit": "bpc", "why": "w", field: value}
    with pytest.raises(ValueError, match=message):
        Floor(**fields)


def test_contract_still_imports_without_torch_or_numpy():
    code = "import sys, workloads.contract; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_workload_states_its_floors_at_smoke_sizes(name):
    workload = get(name)
    floors = workload.trivial_floors(workload.config(smoke=True))
    if name == "speed":  # it measures, it does not learn
        assert floors == []
        return
    assert floors and len({f.name for f in floors}) == len(floors)
    assert workload.quality_mode in MODES
    for f in floors:
        assert math.isfinite(f.value) and f.margin >= 0 and f.why
        if workload.quality_metric == "val/bpc":
            assert f.unit == "bpc" and 0 < f.value <= 8  # bytes: at most log2(256) bits
        else:
            assert workload.quality_metric == "val/acc" and f.unit == "accuracy" and 0 < f.value < 1
    perfect = 0.0 if workload.quality_mode == "min" else 1.0
    assert floors[0].cleared(perfect, workload.quality_mode)  # a margin that a perfect model can clear
    if name in ("lm", "distill"):
        bigram, unigram = floors
        assert bigram.name == "bigram" and bigram.value < unigram.value  # conditioning can only help
