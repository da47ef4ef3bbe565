"""LR and evaluation schedules against exact values (torchtitan-style step-by-step checks)."""

import math

import pytest

from harness.config.schema import TrainConfig
from harness.loop.schedule import ScheduleConfig, eval_steps, lr_factor


def factors(n, **kw):
    return [lr_factor(s, n, ScheduleConfig(**kw)) for s in range(n)]


def test_warmup_then_constant():
    assert factors(10, name="constant", warmup_frac=0.3) == [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]


def test_cosine_exact():
    f = factors(10, name="cosine", warmup_frac=0.2, min_lr_frac=0.1)
    assert f[:2] == [0.5, 1.0]
    # after warmup p = (s - 2) / 8; the same formula in fp64, associated differently: a few ulps (2.2e-16) at 1
    for s in range(2, 10):
        p = (s - 2) / 8
        assert f[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)), abs=1e-15)
    assert f[2] == 1.0 and f[6] == pytest.approx(0.55, abs=1e-15)


def test_cosine_without_warmup_starts_at_peak():
    f = factors(4, name="cosine", warmup_frac=0.0, min_lr_frac=0.0)
    assert f == pytest.approx([1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2])


def test_linear_exact():
    assert factors(5, name="linear", warmup_frac=0.0, min_lr_frac=0.0) == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert factors(6, name="linear", warmup_frac=1 / 6, min_lr_frac=0.5) == pytest.approx(
        [1.0, 1.0, 0.9, 0.8, 0.7, 0.6])


def test_wsd_exact():
    # 10 steps, warmup 1, decay over the last 4 steps to 0: stable at 1, then 1, .75, .5, .25
    f = factors(10, name="wsd", warmup_frac=0.1, min_lr_frac=0.0, decay_frac=0.4)
    assert f == pytest.approx([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25])


def test_out_of_range_step_is_an_error():
    with pytest.raises(ValueError):
        lr_factor(10, 10, ScheduleConfig())


def test_eval_schedule_denser_at_end():
    t = TrainConfig(max_steps=100, eval_every=25, eval_dense_every=5, eval_dense_frac=0.2)
    assert eval_steps(t) == [0, 25, 50, 75, 80, 85, 90, 95, 100]
    t = TrainConfig(max_steps=7, eval_every=3, eval_dense_every=1, eval_dense_frac=0.0)
    assert eval_steps(t) == [0, 3, 6, 7]
