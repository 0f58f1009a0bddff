"""CurriculumScheduler: phases, tau and retention at given steps, resume."""

from __future__ import annotations

import math

import pytest

from datalora.config import DATALORAConfig
from datalora.curriculum import CurriculumScheduler


def make(total=90, **kw):
    return CurriculumScheduler(5.0, 0.5, 0.5, total_steps=total, **kw)


@pytest.mark.parametrize("step,phase,tau,retention,hard", [
    (0, "warmup", 5.0, 1.0, False),
    (29, "warmup", 5.0, 1.0, False),          # last warmup step
    (30, "sparsification", 5.0, 1.0, False),   # boundary: annealing starts from init
    (45, "sparsification", 5.0 * 0.1 ** 0.5, 0.75, False),  # halfway, geometric tau
    (59, "sparsification", 5.0 * 0.1 ** (29 / 30), 1 - 0.5 * 29 / 30, False),
    (60, "hardening", 0.5, 0.5, True),
    (90, "hardening", 0.5, 0.5, True),
    (500, "hardening", 0.5, 0.5, True),         # past the end is clamped
])
def test_schedule_by_steps(step, phase, tau, retention, hard):
    s = make().state_at(step)
    assert s.phase == phase and s.hard is hard
    assert math.isclose(s.tau, tau, rel_tol=1e-12)
    assert math.isclose(s.retention, retention, rel_tol=1e-12)


def test_phase_boundaries_of_a_long_run_are_exact_steps():
    """The step before a boundary is still in the earlier phase (3000 steps: 1000, 2000)."""
    s = make(total=3000)
    assert [s.state_at(i).phase for i in (999, 1000, 1999, 2000)] == [
        "warmup", "sparsification", "sparsification", "hardening"]


def test_schedule_by_epochs_matches_the_card():
    s = CurriculumScheduler.from_config(DATALORAConfig(), num_epochs=3, mode="epochs")
    assert s.state_at(epoch=0.99).phase == "warmup"
    assert s.state_at(epoch=0.99).retention == 1.0
    assert s.state_at(epoch=1.0).phase == "sparsification"
    mid = s.state_at(epoch=1.5)
    assert math.isclose(mid.retention, 0.75) and 0.5 < mid.tau < 5.0
    last = s.state_at(epoch=2.0)
    assert (last.phase, last.tau, last.retention, last.hard) == ("hardening", 0.5, 0.5, True)
    # a dict of its fields failed with AttributeError: no attribute 'temperature_init'
    with pytest.raises(TypeError, match=r"^config: expected a DATALORAConfig, got dict"):
        CurriculumScheduler.from_config({"temperature_init": 5.0}, total_steps=10)


def test_monotone_annealing():
    s = make(total=100)
    states = [s.state_at(i) for i in range(101)]
    taus = [x.tau for x in states]
    rets = [x.retention for x in states]
    assert all(a >= b for a, b in zip(taus, taus[1:], strict=False))
    assert all(a >= b for a, b in zip(rets, rets[1:], strict=False))
    assert [x.phase_index for x in states] == sorted(x.phase_index for x in states)


def test_custom_split_and_boundaries():
    s = make(total=10, split=(0.2, 0.5, 0.3))
    assert s.phase_boundaries() == [2, 7]
    assert [s.state_at(i).phase_index for i in range(10)] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]
    s0 = make(total=10, split=(0.0, 0.0, 1.0))
    assert s0.state_at(0).phase == "hardening"


def test_step_and_resume_exact():
    a = make(total=40)
    for _ in range(17):
        a.step()
    saved = a.state_dict()
    b = make(total=999, split=(0.5, 0.25, 0.25))  # different settings are overwritten
    b.load_state_dict(saved)
    assert b.state == a.state and b.state_dict() == saved
    for _ in range(5):
        assert a.step() == b.step()
    with pytest.raises(ValueError, match="missing"):
        b.load_state_dict({"step_count": 3})
    for bad in (None, [("step_count", 3)]):  # was "'NoneType' object is not iterable"
        with pytest.raises(TypeError, match=r"^state: expected a mapping"):
            b.load_state_dict(bad)


def test_apply_sets_model_state():
    calls = {}

    class M:
        def set_curriculum_state(self, **kw):
            calls.update(kw)

    s = make(total=10)
    s.step(9)
    s.apply(M())
    assert calls == {"tau": 0.5, "retention": 0.5, "hard": True}


@pytest.mark.parametrize("kwargs,name", [
    (dict(temperature_init=0.0), "temperature"),
    (dict(target_retention=1.5), "target_retention"),
    (dict(split=(0.5, 0.5, 0.5)), "split"),
    (dict(mode="minutes"), "mode"),
    (dict(total_steps=0), "total_steps"),
    (dict(temperature_init=0.5, temperature_final=5.0),
     r"temperature_final: expected <= temperature_init=0.5"),
])
def test_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        CurriculumScheduler(**kwargs)
    with pytest.raises(ValueError, match="total_steps"):
        CurriculumScheduler().state_at(3)


@pytest.mark.parametrize("total", [10, 30, 300])
def test_schedule_agrees_with_phase_boundaries(total):
    """0.1 + 0.2 is 0.30000000000000004: the phase switches at phase_boundaries() exactly,
    and retention never rounds above 1."""
    c = CurriculumScheduler(split=[0.1, 0.2, 0.7], total_steps=total)
    b1, b2 = c.phase_boundaries()
    for step in range(total + 1):
        expected = 0 if step < b1 else 1 if step < b2 else 2
        assert c.state_at(step).phase_index == expected, step
        assert 0 < c.state_at(step).retention <= 1.0


@pytest.mark.parametrize("split", [[float("nan"), 0.5, 0.5], [0.5, 0.5, float("inf")],
                                   ["a", 0.5, 0.5], None, 1.0, [0.5, 0.5]])
def test_non_finite_or_malformed_split_is_refused(split):
    with pytest.raises(ValueError, match="split: expected 3 non-negative fractions"):
        CurriculumScheduler(split=split, total_steps=10)
    with pytest.raises(ValueError, match="curriculum_split: expected 3 non-negative"):
        DATALORAConfig(curriculum_split=split)


@pytest.mark.parametrize("name", ["temperature_init", "temperature_final"])
@pytest.mark.parametrize("value", [float("inf"), float("nan"), None, "5", True, 0.0])
def test_scheduler_temperatures_must_be_finite_positive_numbers(name, value):
    with pytest.raises(ValueError, match=f"{name}: expected a finite number"):
        CurriculumScheduler(**{name: value}, total_steps=10)


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "3", True, 0.0, -1])
def test_num_epochs_must_be_a_finite_positive_number(value):
    with pytest.raises(ValueError, match="num_epochs: expected a finite number > 0"):
        CurriculumScheduler(num_epochs=value, mode="epochs")


@pytest.mark.parametrize("layers", [[0, 1.5], [0.5, 2], ["0", 2], [1], 3])
def test_config_prune_layers_must_be_two_ints(layers):
    with pytest.raises(ValueError, match=r"prune_layers(\[[01]\])?: expected"):
        DATALORAConfig(prune_layers=layers)


def test_from_config_takes_every_schedule_setting():
    config = DATALORAConfig(temperature_init=4.0, temperature_final=1.0, target_retention=0.25,
                            curriculum_split=[0.1, 0.3, 0.6])
    s = CurriculumScheduler.from_config(config, total_steps=10)
    assert s.phase_boundaries() == [1, 4]
    assert s.state_at(0).tau == 4.0
    mid = s.state_at(2.5)  # halfway through sparsification
    assert math.isclose(mid.tau, 2.0) and math.isclose(mid.retention, 0.625)
    end = s.state_at(10)
    assert (end.phase, end.tau, end.retention, end.hard) == ("hardening", 1.0, 0.25, True)


def test_progress_is_clamped_and_an_epoch_position_resumes():
    s = make(total=90)
    assert s.state_at(500).progress == 1.0 and s.state_at(-3).progress == 0.0
    a = CurriculumScheduler(5.0, 0.5, 0.5, num_epochs=3, mode="epochs")
    a.step(epoch=1.5)
    b = CurriculumScheduler(5.0, 0.5, 0.5, num_epochs=3, mode="epochs")
    b.load_state_dict(a.state_dict())
    assert b.state == a.state and math.isclose(b.state.retention, 0.75)


def test_step_advances_by_one_and_boundaries_round_up():
    """step() without an argument moves to the next step; a boundary that falls between
    steps is the first step past it (thirds of 10 steps: 3.33 -> 4, 6.67 -> 7)."""
    s = make(total=10)
    assert [s.step().progress for _ in range(3)] == [0.1, 0.2, 0.3]
    assert s.step_count == 3 and s.state == s.state_at(3)
    assert s.phase_boundaries() == [4, 7]
    assert [s.state_at(i).phase_index for i in range(10)] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_temperature_final_may_equal_but_not_exceed_temperature_init():
    assert CurriculumScheduler(1.0, 1.0, total_steps=4).state_at(2).tau == 1.0  # constant tau
    with pytest.raises(ValueError, match="temperature_final: expected <= temperature_init"):
        CurriculumScheduler(1.0, 1.01, total_steps=4)


def test_positions_that_are_not_numbers_are_refused():
    """NaN compared False with every phase boundary, so a NaN step, epoch or progress
    silently meant "hardening"; step() truncated 2.7 and parsed "5"; a NaN epoch was restored
    from a state dict; apply(None) raised AttributeError."""
    s = make(total=10)
    assert s.state_at_progress(1 + 1e-12).phase == "hardening"  # rounding past the end
    for call, match in [(lambda: s.state_at(step=float("nan")), "step: expected a finite"),
                        (lambda: s.state_at_progress(50), r"progress: expected .* \[0, 1\]"),
                        (lambda: s.state_at_progress(float("nan")), "progress: expected"),
                        (lambda: s.step(2.7), r"step: expected an int >= 0, got 2\.7"),
                        (lambda: s.step("5"), "step: expected an int"),
                        (lambda: s.step(-1), "step: expected an int >= 0")]:
        with pytest.raises(ValueError, match=match):
            call()
    assert s.step_count == 0
    # a whole float and one-value tensors / numpy values (a Trainer state may hold them) pass
    import numpy as np
    import torch

    assert [s.step(v).progress for v in (3.0, torch.tensor(4), np.int64(5))] == [0.3, 0.4, 0.5]
    assert s.state_at(step=torch.tensor(6.0)).progress == 0.6
    e = CurriculumScheduler(5.0, 0.5, 0.5, num_epochs=3, mode="epochs")
    assert e.step(epoch=torch.tensor(1.5)).progress == 0.5 and type(e.epoch) is float
    with pytest.raises(ValueError, match="epoch: expected a finite number >= 0"):
        e.step(epoch=float("nan"))
    with pytest.raises(ValueError, match="epoch: expected a finite"):
        e.state_at(epoch=float("nan"))
    state = e.state_dict()
    state["epoch"] = float("nan")
    with pytest.raises(ValueError, match=r"state\['epoch'\]: expected a finite"):
        e.load_state_dict(state)
    assert e.epoch == 1.5  # unchanged
    with pytest.raises(TypeError, match="model: expected a DATALORAModel"):
        s.apply(None)
