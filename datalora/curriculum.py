"""``CurriculumScheduler``: warmup -> sparsification -> hardening (the seed model card).

* **warmup**: dense (retention 1), soft routing at ``tau = temperature_init``;
* **sparsification**: retention annealed linearly 1 -> ``target_retention`` and ``tau``
  geometrically ``temperature_init -> temperature_final``; routing still soft;
* **hardening**: ``tau = temperature_final``, retention = target, straight-through hard
  routing.

Progress is the fraction of training done, measured in optimizer steps
(``mode="steps"``: ``step / total_steps``) or in epochs (``mode="epochs"``:
``epoch / num_epochs``, with the Trainer's fractional epoch). The phases take the
fractions ``split`` of it (3 equal thirds: one epoch each over 3 epochs, as in the card).
The schedule is a pure function of progress, so ``state_dict`` (the position and the
settings) restores it exactly.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from datalora.checks import as_scalar, as_whole, check_fractions, check_int, check_number

if TYPE_CHECKING:  # datalora.config imports this module
    from datalora.config import DATALORAConfig

PHASES = ("warmup", "sparsification", "hardening")
MODES = ("steps", "epochs")


def check_mode(name: str, mode: object) -> str:
    """``mode`` if it is one of :data:`MODES`; otherwise ValueError naming ``name``."""
    if mode not in MODES:
        raise ValueError(f"{name}: expected 'steps' or 'epochs', got {mode!r}")
    return mode


@dataclass(frozen=True)
class CurriculumState:
    """The schedule's values at one point of training.

    Attributes:
        phase: one of :data:`PHASES`. phase_index: 0, 1 or 2.
        tau: Gumbel temperature. retention: fraction of tokens kept in the pruned range.
        hard: straight-through hard routing decisions.
        progress: fraction of training done, in [0, 1].
    """

    phase: str
    phase_index: int
    tau: float
    retention: float
    hard: bool
    progress: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_temperature_order(temperature_init: float, temperature_final: float) -> None:
    """ValueError naming ``temperature_final`` when it is above ``temperature_init``: the
    curriculum anneals tau down from the one to the other."""
    if temperature_final > temperature_init:
        raise ValueError(f"temperature_final: expected <= temperature_init={temperature_init} "
                         f"(the curriculum anneals tau down from temperature_init to "
                         f"temperature_final), got {temperature_final}")


def _position(name: str, value: Any, *, integer: bool = False, low: float | None = None):
    """A step (``integer``: an int, or a float / one-value tensor holding one) or an epoch
    as a checked Python number; NaN, strings and fractional steps are refused."""
    if integer and type(value) is int and (low is None or value >= low):  # the Trainer's
        return value
    value = as_scalar(value)
    if integer:
        return check_int(name, as_whole(value), low=None if low is None else int(low))
    return check_number(name, value, low=low)


class CurriculumScheduler:
    """Maps training progress to ``(phase, tau, retention, hard)``.

    Args:
        temperature_init / temperature_final: tau at the start / end (both > 0).
        target_retention: retention reached at the end of sparsification, in (0, 1].
        split: fractions of training in warmup, sparsification, hardening (sum 1).
        total_steps: optimizer steps of the run (for ``mode="steps"``).
        num_epochs: epochs of the run (for ``mode="epochs"``).
        mode: ``"steps"`` or ``"epochs"``.
    """

    def __init__(self, temperature_init: float = 5.0, temperature_final: float = 0.5,
                 target_retention: float = 0.5,
                 split: tuple[float, float, float] | list[float] = (1 / 3, 1 / 3, 1 / 3),
                 total_steps: int | None = None, num_epochs: float | None = None,
                 mode: str = "steps"):
        temperature_init = check_number("temperature_init", temperature_init, low=0,
                                        low_inclusive=False)
        temperature_final = check_number("temperature_final", temperature_final, low=0,
                                         low_inclusive=False)
        check_temperature_order(temperature_init, temperature_final)
        target_retention = check_number("target_retention", target_retention, low=0,
                                        low_inclusive=False, high=1)
        split = check_fractions("split", split)
        check_mode("mode", mode)
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps, low=1)
        if num_epochs is not None:
            num_epochs = check_number("num_epochs", num_epochs, low=0, low_inclusive=False)
        self.temperature_init = float(temperature_init)
        self.temperature_final = float(temperature_final)
        self.target_retention = float(target_retention)
        self.split = split
        self.total_steps = total_steps
        self.num_epochs = num_epochs
        self.mode = mode
        self.step_count = 0
        self.epoch = 0.0

    @classmethod
    def from_config(cls, config: DATALORAConfig, total_steps: int | None = None,
                    num_epochs: float | None = None, mode: str = "steps") -> CurriculumScheduler:
        """Builds the schedule from a :class:`~datalora.config.DATALORAConfig`."""
        from datalora.config import DATALORAConfig

        if not isinstance(config, DATALORAConfig):  # a dict: AttributeError 'temperature_init'
            raise TypeError(f"config: expected a DATALORAConfig, got {type(config).__name__}")
        return cls(config.temperature_init, config.temperature_final, config.target_retention,
                   config.curriculum_split, total_steps=total_steps, num_epochs=num_epochs,
                   mode=mode)

    # ------------------------------------------------------------------ schedule

    def progress(self, step: int | None = None, epoch: float | None = None) -> float:
        """Fraction of training done at ``step`` (steps mode) or ``epoch`` (epochs mode)."""
        if self.mode == "steps":
            if self.total_steps is None:
                raise ValueError("total_steps: required for mode='steps' (set it or use "
                                 "mode='epochs' with num_epochs)")
            # a query may fall between steps or outside the run (clamped); NaN may not
            step = self.step_count if step is None else _position("step", step)
            return min(max(step / self.total_steps, 0.0), 1.0)
        if self.num_epochs is None:
            raise ValueError("num_epochs: required for mode='epochs'")
        epoch = self.epoch if epoch is None else _position("epoch", epoch)
        return min(max(epoch / self.num_epochs, 0.0), 1.0)

    def state_at_progress(self, progress: float) -> CurriculumState:
        """The schedule at a training fraction ``progress`` in [0, 1]."""
        # NaN compared False with every boundary: "hardening", silently
        if type(progress) is not float or not 0.0 <= progress <= 1.0:  # fast path: NaN fails
            # a computed step / total drifting past an end by rounding is clamped
            value = as_scalar(progress)
            if not (isinstance(value, numbers.Real) and not isinstance(value, bool)
                    and -1e-9 <= value <= 1 + 1e-9):  # NaN fails too
                raise ValueError(f"progress: expected a finite number in [0, 1], got "
                                 f"{progress!r}")
            progress = min(max(float(value), 0.0), 1.0)
        warm, sparse, _ = self.split
        # compare as phase_boundaries() does: 0.1 + 0.2 is 0.30000000000000004, which would
        # keep step 90 of 300 in sparsification although the boundary is 90
        progress_key = round(progress, 12)
        if progress_key < round(warm, 12):
            return CurriculumState("warmup", 0, self.temperature_init, 1.0, False, progress)
        if progress_key < round(warm + sparse, 12):
            t = min(max((progress - warm) / sparse, 0.0), 1.0)  # rounding above
            tau = self.temperature_init * (self.temperature_final / self.temperature_init) ** t
            retention = 1.0 + (self.target_retention - 1.0) * t
            return CurriculumState("sparsification", 1, tau, retention, False, progress)
        return CurriculumState("hardening", 2, self.temperature_final, self.target_retention,
                               True, progress)

    def state_at(self, step: int | None = None, epoch: float | None = None) -> CurriculumState:
        """The schedule at ``step`` / ``epoch`` (default: the current position)."""
        return self.state_at_progress(self.progress(step, epoch))

    @property
    def state(self) -> CurriculumState:
        return self.state_at()

    def step(self, step: int | None = None, epoch: float | None = None) -> CurriculumState:
        """Moves to ``step`` (default: the next step) and ``epoch``; returns the new state.
        ``step``: an int >= 0, also as a whole float or a one-value tensor / numpy number
        (2.7 and "5" were truncated / parsed); ``epoch``: a finite number >= 0."""
        step_count = (self.step_count + 1 if step is None
                      else _position("step", step, integer=True, low=0))
        if epoch is not None:
            self.epoch = _position("epoch", epoch, low=0)
        self.step_count = step_count
        return self.state

    def phase_boundaries(self) -> list[int]:
        """First step of sparsification and of hardening (steps mode)."""
        if self.total_steps is None:
            raise ValueError("total_steps: required for phase_boundaries")
        warm, sparse, _ = self.split
        return [math.ceil(round(warm * self.total_steps, 9)),
                math.ceil(round((warm + sparse) * self.total_steps, 9))]

    def apply(self, model: Any) -> CurriculumState:
        """Sets the current state on ``model`` (anything with ``set_curriculum_state``)."""
        if not callable(getattr(model, "set_curriculum_state", None)):
            raise TypeError(f"model: expected a DATALORAModel (anything with "
                            f"set_curriculum_state), got {type(model).__name__}")
        state = self.state
        model.set_curriculum_state(tau=state.tau, retention=state.retention, hard=state.hard)
        return state

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        return {"temperature_init": self.temperature_init,
                "temperature_final": self.temperature_final,
                "target_retention": self.target_retention, "split": list(self.split),
                "total_steps": self.total_steps, "num_epochs": self.num_epochs,
                "mode": self.mode, "step_count": self.step_count, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a :meth:`state_dict` (all settings and the position)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state: expected a mapping (CurriculumScheduler.state_dict()), "
                            f"got {type(state).__name__}")
        missing = sorted(set(self.state_dict()) - set(state))
        if missing:
            raise ValueError(f"state: missing keys {missing}")
        restored = CurriculumScheduler(
            state["temperature_init"], state["temperature_final"], state["target_retention"],
            state["split"], total_steps=state["total_steps"], num_epochs=state["num_epochs"],
            mode=state["mode"])
        restored.step_count = _position("state['step_count']", state["step_count"],
                                        integer=True, low=0)  # 4.0 after a JSON round trip
        restored.epoch = _position("state['epoch']", state["epoch"], low=0)
        self.__dict__.update(restored.__dict__)

    def __repr__(self) -> str:
        return (f"CurriculumScheduler(mode={self.mode!r}, total_steps={self.total_steps}, "
                f"num_epochs={self.num_epochs}, split={self.split}, tau={self.temperature_init:g}"
                f"->{self.temperature_final:g}, retention=1->{self.target_retention:g})")


__all__ = ["PHASES", "CurriculumScheduler", "CurriculumState"]
