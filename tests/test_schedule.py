import math

import pytest

from tempflow.math.schedule import budget_fraction, lr_factor


def test_budget_fraction_follows_the_budget_that_binds_first():
    assert budget_fraction(50, 200) == 0.25
    assert budget_fraction(50, 400, elapsed_s=900.0, max_minutes=30) == 0.5  # time binds
    assert budget_fraction(50, 400, nfe=750, max_nfe=1000) == 0.75  # model calls bind
    assert budget_fraction(500, 400, elapsed_s=99999.0, max_minutes=1) == 1.0  # never past the end
    assert budget_fraction(0, 400) == 0.0


def test_schedules_by_hand():
    assert [lr_factor(f) for f in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    assert [lr_factor(f, "linear") for f in (0.0, 0.25, 1.0)] == [1.0, 0.75, 0.0]
    assert lr_factor(0.5, "cosine") == pytest.approx(0.5)
    assert lr_factor(0.25, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_factor(1.0, "cosine", final=0.1) == pytest.approx(0.1)
    # warm-up: linear from 0 over the first 10%, then the decay runs over the remaining 90%
    assert [lr_factor(f, "cosine", warmup=0.1) for f in (0.0, 0.05)] == pytest.approx([0.0, 0.5])
    assert lr_factor(0.1, "cosine", warmup=0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, "cosine", warmup=0.1) == pytest.approx(0.5)
    assert lr_factor(0.05, "constant", warmup=0.1) == pytest.approx(0.5)
    assert lr_factor(0.5, "constant", warmup=0.1) == 1.0
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0.5, "step")
