"""The LR / weight-decay schedules against the original recipe's formula (spec §6.3), every step."""
import math

import numpy as np
import pytest

from stm_dist.engine.config import OptimConfig, ScheduleConfig
from stm_dist.engine.schedule import Schedules, cosine_schedule, steps_per_epoch


def formula(peak, final, epochs, iters, warmup_epochs, warmup_init, warmup_steps=-1):
    """Spec §6.3 written out step by step: linear ramp with both end points, then half cosine."""
    total = epochs * iters
    warm = warmup_steps if warmup_steps > 0 else warmup_epochs * iters
    out = []
    for s in range(total):
        if s < warm:
            out.append(warmup_init + s * (peak - warmup_init) / (warm - 1) if warm > 1 else peak)
        else:
            i, T = s - warm, total - warm
            out.append(final + 0.5 * (peak - final) * (1 + math.cos(math.pi * i / T)))
    return np.array(out)


@pytest.mark.parametrize("family", ["transformer", "cnn"])
def test_lr_schedule_matches_formula_every_step(family):
    # Both recipes of the original at a reduced scale (steps/epoch 1251 -> 7) so every step is checked.
    peak, warm_init, final = (1e-3, 1e-6, 1e-5) if family == "transformer" else (4e-3, 0.0, 1e-6)
    epochs, warmup_epochs, iters = 30, 2, 7
    sched = cosine_schedule(peak, final, epochs, iters, warmup_epochs, warm_init)
    ref = formula(peak, final, epochs, iters, warmup_epochs, warm_init)
    assert sched.shape == (epochs * iters,)
    np.testing.assert_allclose(sched, ref, rtol=1e-12, atol=1e-18)
    assert sched[0] == warm_init and sched[warmup_epochs * iters - 1] == peak
    assert sched[warmup_epochs * iters] == peak  # cosine restarts at the peak (i = 0)
    assert abs(sched[-1] - final) < 1e-3 * peak


def test_full_imagenet_length_and_warmup_steps_override():
    iters = steps_per_epoch(1281167, 1024)
    assert iters == 1251
    s = cosine_schedule(1e-3, 1e-5, 300, iters, 20, 1e-6)
    assert len(s) == 300 * 1251
    ref = formula(1e-3, 1e-5, 300, iters, 20, 1e-6)
    np.testing.assert_allclose(s, ref, rtol=1e-12, atol=1e-18)
    s2 = cosine_schedule(1e-3, 1e-5, 3, 10, 1, 1e-6, warmup_steps=4)
    np.testing.assert_allclose(s2, formula(1e-3, 1e-5, 3, 10, 1, 1e-6, warmup_steps=4), rtol=1e-12)


def test_apply_sets_lr_everywhere_and_wd_only_on_decayed_groups():
    o = OptimConfig(lr=1e-3, warmup_init_lr=1e-6, min_lr=1e-5, weight_decay=0.05, weight_decay_end=0.5)
    sc = ScheduleConfig(epochs=4, warmup_epochs=1)
    s = Schedules(o, sc, iters_per_epoch=5)
    groups = [{"weight_decay": 0.05}, {"weight_decay": 0.0}]
    wd_ref = formula(0.05, 0.5, 4, 5, 0, 0.0)
    lr_ref = formula(1e-3, 1e-5, 4, 5, 1, 1e-6)
    for step in range(20):
        lr = s.apply(groups, step)
        assert lr == pytest.approx(lr_ref[step], rel=1e-12)
        assert groups[0]["lr"] == groups[1]["lr"] == lr
        assert groups[0]["weight_decay"] == pytest.approx(wd_ref[step], rel=1e-12)
        assert groups[1]["weight_decay"] == 0.0
    with pytest.raises(IndexError):
        s.apply(groups, 20)
