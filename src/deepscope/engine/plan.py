"""Plans: what a run measured of its data and machine, what it chose from that, and why.

Every task plans the settings a user left open (None, or an empty model name) from a fingerprint of its data and the
time budget, as nnU-Net configures itself from a data fingerprint. A :class:`Plan` holds the fingerprint, the chosen
settings and one reason per choice; the engine adds the schedule (:func:`fit_schedule`) from measured step times, so
the learning-rate schedule ends when the budget does instead of being cut by the clock. The reasons go to the run
log, the head of config.yaml, metrics.json and report.html, and ``deepscope plan`` prints them without training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from deepscope.config import TrainConfig
from deepscope.errors import DeepscopeError

SETUP_SHARE = 0.93  # of the remaining budget planned for training and validation; the rest absorbs estimation error
VALIDATION_SHARE = 0.15  # at most this share of the budget goes to validation
SAMPLED_EPOCH_S = 150.0  # without passes (sampled patches), about one validation per this many seconds
MIN_EPOCH_S = 15.0  # epochs shorter than this spend much of their time on checkpoints, logs and validation
MIN_STEPS = 20  # the shortest schedule worth training: fewer steps than this learn nothing a user could judge
PASS_TOLERANCE = 0.05  # an epoch within 5% of one pass is made exactly one pass
REFIT_MOST = 1.5  # re-fitting a running schedule gives it at most this many times the epochs first planned
# a running schedule is kept while the epochs left are within this share of what fits (at least 1.5 epochs under,
# 0.5 over): fewer wastes a little of the budget, more eats into the share SETUP_SHARE keeps aside
REFIT_UNDER, REFIT_OVER = 0.05, 0.02


@dataclass
class Plan:
    """The fingerprint of the data, the settings chosen for what the user left open, and why."""

    fingerprint: dict[str, Any] = field(default_factory=dict)  # measured facts, JSON-able
    settings: dict[str, Any] = field(default_factory=dict)  # dotted setting -> planned value
    reasons: list[str] = field(default_factory=list)  # one line per fact or choice, in the order made

    def observe(self, text: str, **values: Any) -> None:
        """A fact of the data or the machine: ``values`` into the fingerprint, ``text`` into the reasons."""
        self.fingerprint.update(values)
        self.reasons.append(text)

    def choose(self, key: str, value: Any, reason: str, shown: str | None = None) -> None:
        """Plan setting ``key`` (dotted: ``model_args.width``, ``augment.flip``) as ``value``, because ``reason``."""
        self.settings[key] = value
        self.reasons.append(f"{key} = {value if shown is None else shown}: {reason}")

    def revise(self, key: str, value: Any, reason: str) -> None:
        """Plan ``key`` anew (a running schedule re-fitted): its setting and its reason replace the first ones."""
        first = next((i for i, line in enumerate(self.reasons) if line.startswith(f"{key} = ")), len(self.reasons))
        self.reasons[first : first + 1] = []
        self.settings[key] = value
        self.reasons.insert(first, f"{key} = {value}: {reason}")

    def apply(self, config: Any) -> None:
        """Write the planned settings into ``config``: ``model_args.X`` into that dict, ``group.X`` into a nested
        settings group, anything else as an attribute."""
        for key, value in self.settings.items():
            head, _, rest = key.partition(".")
            if not rest:
                setattr(config, key, value)
            elif isinstance(getattr(config, head), dict):
                getattr(config, head)[rest] = value
            else:
                setattr(getattr(config, head), rest, value)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: settings groups (dataclasses) as dicts."""
        settings = {
            k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) and not isinstance(v, type) else v
            for k, v in self.settings.items()
        }
        return {"fingerprint": self.fingerprint, "settings": settings, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class Budget:
    """The minutes a run plans for: ``--max-minutes``, or the task's stated default (then training is not cut)."""

    minutes: float
    given: bool

    @property
    def seconds(self) -> float:
        return 60.0 * self.minutes

    def describe(self) -> str:
        return f"{self.minutes:g} min" + ("" if self.given else " (no --max-minutes: the task's default budget)")


def budget_of(config: TrainConfig, default_minutes: float) -> Budget:
    """The budget of ``config``; ``default_minutes`` when the user gave none."""
    if config.max_minutes is None:
        return Budget(default_minutes, False)
    if not math.isfinite(config.max_minutes) or config.max_minutes <= 0:
        raise DeepscopeError(f"--max-minutes must be a positive number of minutes, got {config.max_minutes:g}")
    return Budget(float(config.max_minutes), True)


@dataclass(frozen=True)
class Schedule:
    epochs: int
    steps_per_epoch: int
    seconds: float  # the training time (steps, validations, checkpoints) the schedule was fitted to


def refit_epochs(planned: int, epochs: int, done: int, epoch_s: float, left_s: float) -> int:
    """The epochs of a running schedule (``planned`` at first, ``epochs`` now, ``done`` of them trained) re-fitted to
    the ``left_s`` seconds planned for the rest, from the epochs' ``epoch_s``. They are kept while the epochs left
    are within ``REFIT_OVER`` (at least half an epoch) over and ``REFIT_UNDER`` (at least one and a half) under what
    fits: epoch times vary by a few percent, and a schedule re-fitted back and forth at each epoch would jitter its
    learning rate. Else they are made as many as fit: at least one more (the clock stops a run that overruns), at
    most ``REFIT_MOST`` times those first planned."""
    fits = left_s / max(epoch_s, 1e-9)
    if fits - max(1.5, REFIT_UNDER * fits) <= epochs - done <= fits + max(0.5, REFIT_OVER * fits):
        return epochs
    return min(done + max(1, round(fits)), math.ceil(REFIT_MOST * planned))


def fit_schedule(
    plan: Plan,
    *,
    budget: Budget,
    spent_s: float,
    step_s: float,
    val_s: float,
    pass_steps: int | None,
    epochs: int | None,
    steps_per_epoch: int | None,
) -> Schedule:
    """Epochs and steps per epoch that fill what is left of ``budget`` with steps of ``step_s`` seconds and one
    validation of ``val_s`` seconds per epoch. Settings the user gave (``epochs``, ``steps_per_epoch``) stay; with
    ``epochs`` given, an epoch is at most one pass (shortened so that they fit, never lengthened to fill the budget).

    ``pass_steps`` is one pass over the training set (None where an epoch is a number of sampled patches): an open
    number of epochs is then about as many passes as fit, and an epoch is shortened rather than the schedule cut, or
    lengthened beyond one pass where validating after every pass would take more than ``VALIDATION_SHARE`` of the
    budget, or than ``MIN_EPOCH_S`` seconds. ``val_s`` counts all an epoch costs beside its steps (validation,
    checkpoint). Without ``pass_steps``, open epochs are about one validation per 150 s.
    Raises a :class:`DeepscopeError` naming the minimum budget when not even one epoch of ``MIN_STEPS`` steps and a
    validation fit.
    """
    available = max(budget.seconds - spent_s, 0.0) * SETUP_SHARE
    need = spent_s + (MIN_STEPS * step_s + val_s) / SETUP_SHARE
    if budget.seconds < need:
        raise DeepscopeError(
            f"a budget of {budget.minutes:g} min is too short: setting up took {spent_s:.0f} s, and the smallest "
            f"schedule ({MIN_STEPS} steps of {step_s:.2f} s and one validation of {val_s:.0f} s, as measured) "
            f"needs about {math.ceil(need / 60 * 10) / 10:g} min in all; give --max-minutes "
            f"{math.ceil(need / 60 * 10) / 10:g} or more, or a smaller model"
        )
    source = budget.describe()
    given_epochs = epochs is not None
    if epochs is None:
        per_pass = (pass_steps or 0) * step_s + val_s
        if not pass_steps:
            epochs = max(1, round(available / SAMPLED_EPOCH_S))
            why = f"about one validation per {available / epochs / 60:.1f} min"
        else:
            epochs = max(1, round(available / per_pass))
            why = f"one pass of {pass_steps} steps and a validation take {per_pass:.0f} s"
        most = max(1, int(VALIDATION_SHARE * available / val_s)) if val_s > 0 else epochs
        if epochs > most:
            epochs, why = most, f"{why}; validations ({val_s:.1f} s each) kept within {VALIDATION_SHARE:.0%}"
        if epochs > available / MIN_EPOCH_S:
            epochs = max(1, int(available / MIN_EPOCH_S))
            why = f"{why}; epochs of at least {MIN_EPOCH_S:g} s (each ends with a validation and a checkpoint)"
        plan.choose("epochs", epochs, f"{why}, in {available / 60:.1f} of the {source} left for training")
    if steps_per_epoch is None:
        steps_per_epoch = max(1, int((available / epochs - val_s) / step_s))
        if given_epochs and pass_steps is not None:
            steps_per_epoch = min(steps_per_epoch, pass_steps)  # the epochs asked for, shortened only to fit
        if pass_steps is not None and abs(steps_per_epoch - pass_steps) <= PASS_TOLERANCE * pass_steps:
            steps_per_epoch = pass_steps  # a whole pass: every image once an epoch
        else:
            whole = "" if pass_steps is None else f" (one pass over the training set is {pass_steps} steps)"
            plan.choose(
                "steps_per_epoch",
                steps_per_epoch,
                f"{epochs} x {steps_per_epoch} steps of {step_s:.3f} s and {epochs} validations of {val_s:.1f} s "
                f"(measured) fill the {source}; the learning-rate schedule ends with them{whole}",
            )
    return Schedule(epochs, steps_per_epoch, available)
