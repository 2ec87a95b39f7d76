"""Metrics: how a name logged several times in a step becomes one number."""

import math

import pytest
import torch

from posttrain.metrics import Metrics


def test_reductions():
    m = Metrics()
    for v in (1.0, 2.0, 6.0):
        m.log("a/mean", v)
        m.log("a/sum", v, reduce="sum")
        m.log("a/max", v, reduce="max")
        m.log("a/min", v, reduce="min")
        m.log("a/last", torch.tensor(v), reduce="last")
    assert m.summary() == {"a/mean": 3.0, "a/sum": 9.0, "a/max": 6.0, "a/min": 1.0, "a/last": 6.0}


def test_weighted_mean_is_the_token_mean_over_micro_batches():
    # Two micro-batches: 3 tokens averaging 0.2, 1 token at 0.6. Token mean (0.6 + 0.6) / 4 = 0.3;
    # the mean of the two means would be 0.4.
    m = Metrics()
    m.log("x/p", 0.2, weight=3)
    m.log("x/p", torch.tensor(0.6), weight=torch.tensor(1))
    assert m.summary()["x/p"] == pytest.approx(0.3)


def test_nan_and_zero_weights():
    m = Metrics()
    m.log("n/partly", float("nan"), weight=5)
    m.log("n/partly", 2.0, weight=1)
    m.log("n/zero", 4.0, weight=0)
    m.log("n/zero", 6.0, weight=0)  # nothing weighted: the plain mean
    m.log("n/all_nan", float("nan"))
    s = m.summary()
    assert s["n/partly"] == 2.0 and s["n/zero"] == 5.0 and math.isnan(s["n/all_nan"])


def test_bad_calls_name_the_metric():
    m = Metrics()
    with pytest.raises(ValueError, match=r"metrics.log\('q'\): unknown reduce 'median'"):
        m.log("q", 1.0, reduce="median")
    with pytest.raises(ValueError, match=r"metrics.log\('q'\): weight only applies to reduce='mean', not 'sum'"):
        m.log("q", 1.0, reduce="sum", weight=2)
    with pytest.raises(ValueError, match=r"metrics.log\('q'\): weight must be finite and >= 0, got -1.0"):
        m.log("q", 1.0, weight=-1)
