"""When to checkpoint: declarative, composable triggers (like Prefect's schedule objects).

A ``CheckpointSchedule`` is a list of triggers plus how saves are run. It is a pydantic model,
so it can be written in Python, in JSON, or passed as a deployment parameter::

    CheckpointSchedule(triggers=[
        EveryNSteps(every=50),                       # heavy: full state, all regions, quorum
        EveryNSteps(every=10, tier="light"),         # light: weights, RNG, data position
        Timebox(seconds=600),                        # at most 10 minutes of work unsaved
        Milestones(names=["epoch_end", "eval_best"], steps=[1000]),
    ])

When several triggers fire on one step, the heavy tier wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Tier = Literal["light", "heavy"]
LIGHT_COMPONENTS = ("model", "rng", "data", "counters", "determinism")


class _Trigger(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tier: Tier = "heavy"


class EveryNSteps(_Trigger):
    """Save after every ``every``-th completed step."""

    kind: Literal["every_n_steps"] = "every_n_steps"
    every: int = Field(ge=1, description="Steps between saves.")

    def fires(self, step: int, previous: int, seconds_since: float, milestone: str | None) -> bool:
        return milestone is None and step > 0 and step // self.every > previous // self.every


class Timebox(_Trigger):
    """Save once ``seconds`` of work have passed since the last save of this tier or heavier."""

    kind: Literal["timebox"] = "timebox"
    seconds: float = Field(gt=0, description="Most seconds of work that may go unsaved.")

    def fires(self, step: int, previous: int, seconds_since: float, milestone: str | None) -> bool:
        return milestone is None and seconds_since >= self.seconds


class Milestones(_Trigger):
    """Save at named events (``checkpointer.milestone("epoch_end")``) or at given steps."""

    kind: Literal["milestones"] = "milestones"
    names: list[str] = Field(default_factory=list, description="Event names that save.")
    steps: list[int] = Field(default_factory=list, description="Step numbers that save.")

    def fires(self, step: int, previous: int, seconds_since: float, milestone: str | None) -> bool:
        if milestone is not None:
            return milestone in self.names
        return any(previous < target <= step for target in self.steps)


Trigger = Annotated[EveryNSteps | Timebox | Milestones, Field(discriminator="kind")]


class CheckpointSchedule(BaseModel):
    """When to save, which tier, and how asynchronous saves behave under pressure."""

    model_config = ConfigDict(extra="forbid")

    triggers: list[Trigger] = Field(
        default_factory=lambda: [EveryNSteps(every=50)], description="What makes a save happen."
    )
    light_components: list[str] = Field(
        default_factory=lambda: list(LIGHT_COMPONENTS),
        description="State components a light save captures.",
    )
    asynchronous: bool = Field(default=True, description="Write saves in the background.")
    max_in_flight: int = Field(default=2, ge=1, description="Saves queued or writing at once.")
    on_backpressure: Literal["wait", "skip"] = Field(
        default="wait", description="When max_in_flight saves are pending: wait for one, or skip this save."
    )
    emergency_deadline_seconds: float = Field(
        default=30.0, gt=0, description="Time allowed for the emergency save on SIGTERM before exiting."
    )

    def decide(
        self,
        step: int,
        *,
        seconds_since: dict[str, float] | float,
        milestone: str | None = None,
        previous_step: int | None = None,
    ) -> tuple[Tier, str] | None:
        """The tier to save now and the trigger that asked for it, or None.

        Args:
            step: Completed steps so far.
            seconds_since: Seconds since the last save, per tier (``{"light": .., "heavy": ..}``)
                or one number for both.
            milestone: The event being reported, if this is a milestone call.
            previous_step: Completed steps at the last call (default ``step - 1``), so a call
                that advances several steps still fires for every boundary it crossed.
        """
        previous = step - 1 if previous_step is None else previous_step
        chosen: tuple[Tier, str] | None = None
        for trigger in self.triggers:
            since = seconds_since if isinstance(seconds_since, float | int) else seconds_since[trigger.tier]
            if trigger.fires(step, previous, float(since), milestone):
                label = trigger.kind if milestone is None else f"milestone:{milestone}"
                if chosen is None or (trigger.tier == "heavy" and chosen[0] == "light"):
                    chosen = (trigger.tier, label)
        return chosen

    @classmethod
    def every(cls, steps: int, *, milestones: Sequence[str] = ("final",)) -> CheckpointSchedule:
        """Shorthand: heavy every ``steps`` steps, plus named milestones."""
        return cls(triggers=[EveryNSteps(every=steps), Milestones(names=list(milestones))])
