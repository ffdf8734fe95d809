"""Steps of the same name in two pipelines (issue 13): each keeps its own code identity, so a
recovery's drift check compares a journaled step with the definition that ran it, not with
whichever pipeline happened to be imported last."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from prefect_recovery.tasks.code import digest_of
from prefect_recovery.tasks.step import STEP_CODE

STEP_MODULE = """
from prefect_recovery import step

@step(name="train-twin")
def train(x: int) -> int:
    return x + {offset}
"""


def load_module(tmp_path: Path, name: str, offset: int):
    path = tmp_path / f"{name}.py"
    path.write_text(STEP_MODULE.format(offset=offset))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_two_pipelines_defining_the_same_step_name_keep_their_own_code(tmp_path: Path) -> None:
    first = load_module(tmp_path, "pipeline_one_steps", 1)
    second = load_module(tmp_path, "pipeline_two_steps", 2)
    try:
        assert "train-twin" in STEP_CODE
        one = STEP_CODE.modules("train-twin", {"pipeline_one_steps": "x"})
        two = STEP_CODE.modules("train-twin", {"pipeline_two_steps": "x"})
        assert one is not None and two is not None and one != two
        assert "pipeline_one_steps" in one and "pipeline_two_steps" in two
        # without a record to tell them apart, the name is ambiguous: no guess
        assert STEP_CODE.definition("train-twin") is None
        # the first pipeline's journaled step compares with its own definition: no drift
        assert STEP_CODE.digest("train-twin", one) == digest_of(one)

        # re-importing a module replaces its definition instead of adding a third
        load_module(tmp_path, "pipeline_one_steps", 1)
        assert len(STEP_CODE.functions["train-twin"]) == 2
    finally:
        STEP_CODE.functions.pop("train-twin", None)
        for name in ("pipeline_one_steps", "pipeline_two_steps"):
            sys.modules.pop(name, None)
    assert first is not second


def test_the_recovery_drift_check_compares_a_step_with_the_definition_that_ran_it(tmp_path: Path) -> None:
    from prefect_recovery.core.journal import JournalEvent, JournalEventBody
    from prefect_recovery.core.region import open_region
    from prefect_recovery.core.store import Store
    from prefect_recovery.tasks.preflight import PreflightContext, check_code

    load_module(tmp_path, "pipeline_one_steps", 1)
    load_module(tmp_path, "pipeline_two_steps", 2)
    try:
        one = STEP_CODE.modules("train-twin", {"pipeline_one_steps": "x"})
        (tmp_path / "r").mkdir()
        store = Store([open_region(str(tmp_path / "r"))])

        def completed(code: str) -> JournalEvent:
            data = {"step": "train-twin", "code": code, "code_modules": one}
            body = JournalEventBody(lineage="lin", seq=1, kind="step_completed", run_id="r", time="t", data=data)
            return JournalEvent.build(body)

        def check(code: str):
            return check_code(
                PreflightContext(store=store, lineage="lin", events=[completed(code)], run_started=None, manifest=None)
            )

        # pipeline one's step ran with pipeline one's code: same code, although pipeline two also has a train-twin
        assert check(digest_of(one)).status == "pass"
        # the same step, journaled with another digest: its code changed since it ran
        changed = check("blake3:" + "0" * 64)
        assert changed.status == "warn" and "train-twin" in changed.reason
    finally:
        STEP_CODE.functions.pop("train-twin", None)
        for name in ("pipeline_one_steps", "pipeline_two_steps"):
            sys.modules.pop(name, None)
