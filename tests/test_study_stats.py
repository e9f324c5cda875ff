"""The study's statistics (benchmarks/study.py): McNemar's exact test and the paired bootstrap."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "study.py"


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _answers(rng: random.Random, n: int, p_a: float, p_b: float) -> tuple[list[bool], list[bool]]:
    return [rng.random() < p_a for _ in range(n)], [rng.random() < p_b for _ in range(n)]


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_pairs(study):
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for n, p_a, p_b in [(40, 0.5, 0.5), (300, 0.7, 0.6), (2400, 0.66, 0.69), (50, 0.9, 0.2)]:
        a, b = _answers(rng, n, p_a, p_b)
        only_a = sum(x and not y for x, y in zip(a, b, strict=True))
        discordant = sum(x != y for x, y in zip(a, b, strict=True))
        expected = stats.binomtest(only_a, discordant, 0.5).pvalue
        assert study.mcnemar_p(a, b) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert study.mcnemar_p([True, False], [True, False]) == 1.0  # no discordant pair


def test_the_paired_interval_is_centred_on_the_difference_with_the_normal_width(study):
    rng = random.Random(1)
    a, b = _answers(rng, 2400, 0.66, 0.69)
    right, reference = dict(enumerate(a)), dict(enumerate(b))
    result = study.paired(right, reference)
    differences = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean = sum(differences) / len(differences)
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / (len(differences) - 1))
    half_width = 100 * 1.96 * sd / math.sqrt(len(differences))
    low, high = result["interval"]
    assert result["difference"] == pytest.approx(100 * mean)
    assert low < result["difference"] < high
    assert (high - low) / 2 == pytest.approx(half_width, rel=0.1)
    assert result["discordant"] == sum(x != y for x, y in zip(a, b, strict=True))
