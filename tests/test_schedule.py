"""``CheckpointSchedule``: when a save happens, which tier it is, and how the schedule travels as JSON
(Python, a JSON file, or a deployment parameter in the Prefect UI)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from prefect_recovery.training.schedule import CheckpointSchedule, EveryNSteps, Milestones, Timebox

NEVER = {"light": 0.0, "heavy": 0.0}  # no time has passed since the last save of either tier


def decisions(schedule: CheckpointSchedule, steps: range) -> dict[int, tuple[str, str]]:
    """Every step in ``steps`` where the schedule asks for a save (no time passes)."""
    found = {}
    for step in steps:
        decision = schedule.decide(step, seconds_since=NEVER)
        if decision is not None:
            found[step] = decision
    return found


# -- EveryNSteps ---------------------------------------------------------------------------------
def test_every_n_steps_saves_on_multiples_only():
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=5)])

    assert decisions(schedule, range(0, 21)) == {step: ("heavy", "every_n_steps") for step in (5, 10, 15, 20)}


def test_no_save_before_the_first_completed_step():
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=1)])

    assert schedule.decide(0, seconds_since=NEVER) is None
    assert schedule.decide(1, seconds_since=NEVER) == ("heavy", "every_n_steps")


@pytest.mark.parametrize("light_first", [True, False], ids=["light-listed-first", "heavy-listed-first"])
def test_heavy_and_light_every_n_steps_heavy_wins_when_both_fire(light_first):
    heavy, light = EveryNSteps(every=6), EveryNSteps(every=2, tier="light")
    schedule = CheckpointSchedule(triggers=[light, heavy] if light_first else [heavy, light])

    got = decisions(schedule, range(0, 13))

    assert got == {
        2: ("light", "every_n_steps"),
        4: ("light", "every_n_steps"),
        6: ("heavy", "every_n_steps"),
        8: ("light", "every_n_steps"),
        10: ("light", "every_n_steps"),
        12: ("heavy", "every_n_steps"),
    }


def test_every_n_steps_does_not_fire_again_on_a_milestone_call():
    # step() already saved at step 10; reporting a milestone at the same step must not save twice
    schedule = CheckpointSchedule(triggers=[EveryNSteps(every=10), Milestones(names=["epoch_end"])])

    assert schedule.decide(10, seconds_since=NEVER, milestone="unlisted") is None
    assert schedule.decide(10, seconds_since=NEVER, milestone="epoch_end") == ("heavy", "milestone:epoch_end")


def test_default_schedule_is_heavy_every_50_steps():
    schedule = CheckpointSchedule()

    assert decisions(schedule, range(0, 151)) == {step: ("heavy", "every_n_steps") for step in (50, 100, 150)}


def test_every_shorthand_adds_the_final_milestone():
    schedule = CheckpointSchedule.every(3)

    assert decisions(schedule, range(0, 7)) == {3: ("heavy", "every_n_steps"), 6: ("heavy", "every_n_steps")}
    assert schedule.decide(4, seconds_since=NEVER, milestone="final") == ("heavy", "milestone:final")
    assert schedule.decide(4, seconds_since=NEVER, milestone="epoch_end") is None


# -- Timebox -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("elapsed", "saves"),
    [(0.0, False), (59.999, False), (60.0, True), (60.001, True), (3600.0, True)],
)
def test_timebox_fires_at_or_after_its_seconds_not_before(elapsed, saves):
    schedule = CheckpointSchedule(triggers=[Timebox(seconds=60)])

    # an arbitrary step, not a multiple of anything: only time matters
    decision = schedule.decide(7, seconds_since={"light": elapsed, "heavy": elapsed})

    assert decision == (("heavy", "timebox") if saves else None)


def test_timebox_accepts_one_number_for_both_tiers():
    schedule = CheckpointSchedule(triggers=[Timebox(seconds=30, tier="light")])

    assert schedule.decide(3, seconds_since=29) is None
    assert schedule.decide(3, seconds_since=30) == ("light", "timebox")
    assert schedule.decide(3, seconds_since=31.5) == ("light", "timebox")


def test_timebox_reads_the_seconds_since_its_own_tier():
    schedule = CheckpointSchedule(triggers=[Timebox(seconds=10, tier="light"), Timebox(seconds=60)])

    # a light save 5 s ago, the last heavy one 61 s ago: heavy is due, light is not
    assert schedule.decide(1, seconds_since={"light": 5, "heavy": 61}) == ("heavy", "timebox")
    # a heavy save 20 s ago, the last light one 12 s ago: light is due, heavy is not
    assert schedule.decide(1, seconds_since={"light": 12, "heavy": 20}) == ("light", "timebox")
    # both due: heavy wins
    assert schedule.decide(1, seconds_since={"light": 12, "heavy": 61}) == ("heavy", "timebox")
    # neither due
    assert schedule.decide(1, seconds_since={"light": 9, "heavy": 59}) is None


# -- Milestones ----------------------------------------------------------------------------------
def test_milestones_by_name():
    schedule = CheckpointSchedule(triggers=[Milestones(names=["epoch_end", "eval_best"])])

    assert schedule.decide(17, seconds_since=NEVER, milestone="epoch_end") == ("heavy", "milestone:epoch_end")
    assert schedule.decide(17, seconds_since=NEVER, milestone="eval_best") == ("heavy", "milestone:eval_best")
    assert schedule.decide(17, seconds_since=NEVER, milestone="train_end") is None
    assert schedule.decide(17, seconds_since=NEVER) is None  # a plain step is not a milestone


def test_milestones_by_step_number():
    schedule = CheckpointSchedule(triggers=[Milestones(steps=[3, 1000])])

    assert decisions(schedule, range(0, 1001)) == {3: ("heavy", "milestones"), 1000: ("heavy", "milestones")}


def test_light_milestone_and_heavy_every_n_steps():
    schedule = CheckpointSchedule(triggers=[Milestones(names=["eval"], tier="light"), EveryNSteps(every=4)])

    assert schedule.decide(2, seconds_since=NEVER, milestone="eval") == ("light", "milestone:eval")
    assert schedule.decide(4, seconds_since=NEVER) == ("heavy", "every_n_steps")


# -- JSON, dicts, deployment parameters ------------------------------------------------------------
FULL = CheckpointSchedule(
    triggers=[
        EveryNSteps(every=50),
        EveryNSteps(every=10, tier="light"),
        Timebox(seconds=600),
        Timebox(seconds=45.5, tier="light"),
        Milestones(names=["epoch_end", "eval_best"], steps=[1000]),
    ],
    light_components=["model", "rng", "counters"],
    asynchronous=False,
    max_in_flight=3,
    on_backpressure="skip",
    emergency_deadline_seconds=12.5,
)


def probe(schedule: CheckpointSchedule) -> list[object]:
    """What the schedule decides over a grid of situations (to compare two schedules by behaviour)."""
    out: list[object] = []
    for step in (0, 10, 20, 50, 999, 1000):
        for since in (0.0, 45.5, 600.0):
            out.append(schedule.decide(step, seconds_since={"light": since, "heavy": since}))
        for name in ("epoch_end", "eval_best", "final"):
            out.append(schedule.decide(step, seconds_since=NEVER, milestone=name))
    return out


def test_json_round_trip_keeps_every_trigger_and_setting():
    text = FULL.model_dump_json()
    again = CheckpointSchedule.model_validate_json(text)

    assert again == FULL
    assert [type(t) for t in again.triggers] == [EveryNSteps, EveryNSteps, Timebox, Timebox, Milestones]
    assert probe(again) == probe(FULL)
    assert json.loads(again.model_dump_json()) == json.loads(text)


def test_built_from_a_plain_dict_like_a_deployment_parameter():
    # What the Prefect UI's "Custom run" form or prefect.yaml hands over: plain JSON values
    raw = {
        "triggers": [
            {"kind": "every_n_steps", "every": 50},
            {"kind": "every_n_steps", "every": 10, "tier": "light"},
            {"kind": "timebox", "seconds": 600},
            {"kind": "timebox", "seconds": 45.5, "tier": "light"},
            {"kind": "milestones", "names": ["epoch_end", "eval_best"], "steps": [1000]},
        ],
        "light_components": ["model", "rng", "counters"],
        "asynchronous": False,
        "max_in_flight": 3,
        "on_backpressure": "skip",
        "emergency_deadline_seconds": 12.5,
    }

    schedule = CheckpointSchedule.model_validate(raw)

    assert schedule == FULL
    assert probe(schedule) == probe(FULL)


def test_example_flow_accepts_the_schedule_as_a_parameter():
    from prefect_recovery.examples.pipeline import example_pipeline

    raw = {"triggers": [{"kind": "every_n_steps", "every": 7}, {"kind": "milestones", "names": ["final"]}]}
    params = example_pipeline.validate_parameters({"lineage": "x", "steps": 14, "schedule": raw})

    schedule = params["schedule"]
    assert isinstance(schedule, CheckpointSchedule)
    assert schedule.decide(7, seconds_since=NEVER) == ("heavy", "every_n_steps")
    assert schedule.decide(8, seconds_since=NEVER, milestone="final") == ("heavy", "milestone:final")
    # and the deployment's parameter schema describes it, so the UI can render a form for it
    schema = json.dumps(example_pipeline.parameters.model_dump())
    assert "CheckpointSchedule" in schema


# -- invalid schedules -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        {"triggers": [{"kind": "every_n_steps", "every": 0}]},
        {"triggers": [{"kind": "every_n_steps", "every": -5}]},
        {"triggers": [{"kind": "every_n_steps"}]},
        {"triggers": [{"kind": "every_epoch", "every": 1}]},
        {"triggers": [{"every": 10}]},
        {"triggers": [{"kind": "every_n_steps", "every": 10, "tier": "medium"}]},
        {"triggers": [{"kind": "every_n_steps", "evry": 10}]},
        {"triggers": [{"kind": "timebox", "seconds": 0}]},
        {"triggers": [{"kind": "timebox", "seconds": -1}]},
        {"triggers": [{"kind": "milestones", "names": "epoch_end", "steps": "ten"}]},
        {"max_in_flight": 0},
        {"on_backpressure": "drop"},
        {"emergency_deadline_seconds": 0},
        {"trigers": []},
    ],
    ids=[
        "every=0",
        "every<0",
        "every-missing",
        "unknown-kind",
        "no-kind",
        "unknown-tier",
        "typo-field",
        "timebox=0",
        "timebox<0",
        "milestone-types",
        "max_in_flight=0",
        "unknown-backpressure",
        "deadline=0",
        "typo-top-level",
    ],
)
def test_invalid_schedules_are_rejected(raw):
    with pytest.raises(ValidationError):
        CheckpointSchedule.model_validate(raw)
    with pytest.raises(ValidationError):
        CheckpointSchedule.model_validate_json(json.dumps(raw))


def test_invalid_trigger_objects_are_rejected_in_python_too():
    with pytest.raises(ValidationError):
        EveryNSteps(every=0)
    with pytest.raises(ValidationError):
        Timebox(seconds=0)
