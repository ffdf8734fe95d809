"""Issue 12 class 9 and the rest of it: the journal on a signing store, committed manifests that lost a
copy, reserved derived suffixes in the training layer, and ``ls`` with one forged lineage.

Each test plays a journal writer (someone who can write ``lineages/<lineage>/journal/`` in the regions and
recomputes an event's digest) or a region writer against real local regions and real keys, and asserts what
a user would see: a signing store acts only on journal events it can verify, reports the others as damage
with the store's error type, and a recovery facing a forged event stops with the reason.
docs/THREAT_MODEL.md ("Journal writer") points here.
"""

from __future__ import annotations

import json
import random
import secrets
import uuid
from pathlib import Path
from typing import Any

import pytest
from helpers.tamper import reseal
from typer.testing import CliRunner

from prefect_recovery import CheckpointStore, Region
from prefect_recovery.core import EntryPlan, InvalidNameError, Store, hmac_key, open_region, verify_store
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.errors import JournalError
from prefect_recovery.core.journal import Journal
from prefect_recovery.core.layout import journal_key, manifest_key
from prefect_recovery.core.liveness import process_identity
from prefect_recovery.core.manifest import Component, canonical_json
from prefect_recovery.core.retention import RetentionPolicy, apply_retention, plan_retention
from prefect_recovery.core.signing import Keyring, new_ed25519_key_pem
from prefect_recovery.tasks.pipeline_run import PipelineRun
from prefect_recovery.training.checkpointer import Checkpointer

SECRET = "j" * 40
LINEAGE = "exp"


# -- helpers -----------------------------------------------------------------------------------------------------
def _roots(tmp_path: Path, count: int = 2) -> list[Path]:
    roots = []
    for name in ("eu", "us", "ap")[:count]:
        root = tmp_path / name
        root.mkdir()
        roots.append(root)
    return roots


def _store(roots: list[Path], quorum: int = 2, keyring: Keyring | None = None) -> Store:
    return Store([open_region(str(r), name=r.name) for r in roots], write_quorum=quorum, chunk_bytes=1024,
                 io_threads=2, keyring=keyring)  # fmt: skip


def _signing() -> Keyring:
    return Keyring(hmac_key("k1", SECRET))


def _save(store: Store, lineage: str, seed: str, step: int):
    data = random.Random(seed).randbytes(3000)
    return store.commit(
        lineage, [EntryPlan(name="w", kind="bytes", data=memoryview(data))], step=step, components=[Component(name="w")]
    )


def _event_files(roots: list[Path], seq: int, lineage: str = LINEAGE) -> list[Path]:
    return [root / journal_key(lineage, seq) for root in roots]


def _forge(path: Path, edit) -> None:
    """Rewrite an event the way a journal writer would: change it, drop any signature, recompute its digest."""
    raw = json.loads(path.read_bytes())
    edit(raw)
    raw.pop("signature", None)
    body = {k: v for k, v in raw.items() if k not in ("event_digest", "signature")}
    raw["event_digest"] = hash_bytes(canonical_json(body))
    path.write_bytes(canonical_json(raw))


def _forge_new_event(roots: list[Path], seq: int, like: Path, kind: str, data: dict[str, Any]) -> None:
    """Append a whole new event at ``seq`` in every region, digest recomputed, no (valid) signature."""
    raw = json.loads(like.read_bytes())
    raw.update(seq=seq, kind=kind, data=data)
    raw.pop("signature", None)
    body = {k: v for k, v in raw.items() if k not in ("event_digest", "signature")}
    raw["event_digest"] = hash_bytes(canonical_json(body))
    for path in _event_files(roots, seq):
        path.write_bytes(canonical_json(raw))


def _set_steps(raw: dict[str, Any]) -> None:
    raw["data"]["parameters"]["steps"] = 250


def _crashed_run(store: Store, block: str | None = None) -> None:
    """The journal a SIGKILLed example-pipeline run leaves: run_started (steps 400), step_started train."""
    journal = Journal(store, LINEAGE)
    params = {"lineage": LINEAGE, "steps": 400, "seed": 0, "schedule": None, "store_block": block, "data_path": None}
    dead = {**process_identity(), "pid": 2**22 + 7, "pid_start": 1}  # this host, a pid no process has
    data = {"pipeline": "example-pipeline", "parameters": params, "process": dead}
    journal.append("run_started", run_id="run-1", data=data)
    journal.append("step_started", run_id="run-1", data={"step": "train", "attempt": 1})


# -- class 9: journal events are signed on a signing store and only verified ones are acted upon ------------------
def test_journal_events_on_a_signing_store_are_signed_with_the_manifest_keys(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, keyring=_signing())
    _crashed_run(store)
    for path in _event_files(roots, 1):
        signature = json.loads(path.read_bytes())["signature"]
        assert (signature["algorithm"], signature["key_id"]) == ("hmac-sha256", "k1")
    assert [e.kind for e in Journal(store, LINEAGE).events()] == ["run_started", "step_started"]

    private_pem, public_pem = new_ed25519_key_pem()
    from prefect_recovery.core.signing import ed25519_key

    writer = _store(roots, keyring=Keyring(ed25519_key("ed", private_pem)))
    Journal(writer, "other").append("run_started", run_id="r", data={})
    reader = _store(roots, keyring=Keyring(None, [ed25519_key("ed", public_pem)]))
    assert [e.kind for e in Journal(reader, "other").events()] == ["run_started"]


def test_a_forged_event_in_every_region_is_damage_never_history(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, keyring=_signing())
    _crashed_run(store)
    for path in _event_files(roots, 1):
        _forge(path, _set_steps)
    with pytest.raises(JournalError, match=r"(?s)event 1 .*not signed") as caught:
        Journal(store, LINEAGE).events()
    assert "250" not in str(caught.value)
    found = Journal(store, LINEAGE).read()
    assert set(found.lost) == {1} and all("not signed" in cause for cause in found.lost[1].values())
    assert [e.seq for e in found.events] == [2]


def test_a_forged_copy_in_one_region_is_skipped_and_reported(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, keyring=_signing())
    _crashed_run(store)
    eu, _us = _event_files(roots, 1)
    raw = json.loads(eu.read_bytes())
    _set_steps(raw)  # the old signature stays: the forger cannot make a new one
    body = {k: v for k, v in raw.items() if k not in ("event_digest", "signature")}
    eu.write_bytes(canonical_json({**raw, "event_digest": hash_bytes(canonical_json(body))}))
    found = Journal(store, LINEAGE).read()
    assert found.events[0].data["parameters"]["steps"] == 400
    assert "does not match its content" in found.skipped_copies[1]["eu"]


def test_a_forged_new_event_does_not_finish_a_run_for_retention(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, keyring=_signing())
    journal = Journal(store, LINEAGE)
    journal.append("run_started", run_id="run-1", data={"pipeline": "p", "parameters": {}, "resume_version": 1})
    for version in range(1, 5):
        _save(store, LINEAGE, f"v{version}", step=version * 10)
    policy = RetentionPolicy(keep_last=1)
    assert {d.version for d in plan_retention(store, policy).decisions if d.action == "delete"} == set()

    _forge_new_event(roots, 2, _event_files(roots, 1)[0], "run_finished", {"final_version": 4})
    plan = plan_retention(store, policy)
    assert [d.version for d in plan.decisions if d.action == "delete"] == []
    apply_retention(store, plan)
    assert [info.version for info in store.list(LINEAGE)] == [1, 2, 3, 4]
    assert any("journal" in note and "signed" in note for note in plan.notes), plan.notes


def test_a_stripped_signature_is_accepted_only_while_migrating(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    _crashed_run(_store(roots))  # written before signing was turned on
    plain = Journal(_store(roots), LINEAGE).events()
    assert plain[0].data["parameters"]["steps"] == 400 and all(
        "signature" not in json.loads(p.read_bytes()) for p in _event_files(roots, 1)
    )
    with pytest.raises(JournalError, match="not signed"):
        Journal(_store(roots, keyring=_signing()), LINEAGE).events()
    migrating = Keyring(hmac_key("k1", SECRET), accept_unsigned=True)
    assert [e.kind for e in Journal(_store(roots, keyring=migrating), LINEAGE).events()] == [
        "run_started",
        "step_started",
    ]


def test_unsigned_store_keeps_reading_its_unsigned_journal(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots)
    _crashed_run(store)
    assert [e.kind for e in Journal(store, LINEAGE).events()] == ["run_started", "step_started"]
    assert all("signature" not in json.loads(p.read_bytes()) for p in _event_files(roots, 2))


# -- class 9 through the CLI and recover on a signing CheckpointStore block --------------------------------------
def _signed_block(tmp_path: Path, prefix: str, quorum: int = 2) -> tuple[str, CheckpointStore, list[Path]]:
    from prefect.blocks.system import Secret

    key_id = f"{prefix}-key-{uuid.uuid4().hex[:8]}"
    Secret(value=secrets.token_hex(32)).save(key_id)
    roots = _roots(tmp_path)
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    block = CheckpointStore(regions=[Region(url=str(r), name=r.name) for r in roots], write_quorum=quorum,
                            signing_key=key_id)  # fmt: skip
    block.save(name)
    return name, CheckpointStore.load(name), roots


def test_recover_and_history_stop_on_a_forged_event_of_a_signing_store(prefect_server, tmp_path: Path) -> None:
    from prefect_recovery import cli

    name, block, roots = _signed_block(tmp_path, "forged-journal")
    _crashed_run(block.core, block=name)
    for path in _event_files(roots, 1):
        _forge(path, _set_steps)
    runner = CliRunner()
    result = runner.invoke(cli.app, ["recover", "--store", name, "--lineage", LINEAGE, "--preflight", "warn", "--json"])
    assert result.exit_code != 0, result.output
    error = json.loads(result.stdout)["error"]
    assert "journal" in error and "event 1" in error and "not signed" in error, error
    assert not any((root / "lineages" / LINEAGE / "manifests").exists() for root in roots), "nothing was trained"
    assert sorted(Journal(block.core, LINEAGE).seqs()) == [1, 2], "the recovery wrote no event"

    history = runner.invoke(cli.app, ["history", "--store", name, "--lineage", LINEAGE, "--json"])
    assert history.exit_code != 0 and "not signed" in json.loads(history.stdout)["error"]
    assert "250" not in history.stdout


# -- also: a committed version that lost one manifest copy at quorum N of N ------------------------------------------
@pytest.mark.parametrize("signed", [False, True])
def test_a_journaled_commit_that_lost_a_manifest_copy_is_re_replicated(tmp_path: Path, signed: bool) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, quorum=2, keyring=_signing() if signed else None)
    with PipelineRun(store, LINEAGE, pipeline="p", parameters={}, run_id="run-1") as run:
        for version in (1, 2):
            run.checkpoint_committed(_save(store, LINEAGE, f"v{version}", step=version))
    lost = roots[1] / manifest_key(LINEAGE, 2)
    lost.unlink()
    assert store.latest(LINEAGE).version == 1  # the known symptom

    report = verify_store(store, repair=True)
    assert report.healthy, report
    assert lost.read_bytes() == (roots[0] / manifest_key(LINEAGE, 2)).read_bytes()
    assert store.latest(LINEAGE).version == 2
    assert verify_store(store).healthy


def test_an_unjournaled_below_quorum_manifest_is_still_not_replicated(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, quorum=2)
    for version in (1, 2):
        _save(store, LINEAGE, f"v{version}", step=version)
    (roots[1] / manifest_key(LINEAGE, 2)).unlink()
    report = verify_store(store, repair=True)
    assert not (roots[1] / manifest_key(LINEAGE, 2)).exists()
    assert any("uncommitted manifest" in note for note in report.notes)


def test_a_forged_checkpoint_committed_does_not_replicate_a_crashed_save(tmp_path: Path) -> None:
    roots = _roots(tmp_path)
    store = _store(roots, quorum=2, keyring=_signing())
    with PipelineRun(store, LINEAGE, pipeline="p", parameters={}, run_id="run-1") as run:
        run.checkpoint_committed(_save(store, LINEAGE, "v1", step=1))
        _save(store, LINEAGE, "v2", step=2)  # a save whose commit the run never journaled
    (roots[1] / manifest_key(LINEAGE, 2)).unlink()
    seqs = sorted(Journal(store, LINEAGE).seqs())
    _forge_new_event(roots, seqs[-1] + 1, _event_files(roots, seqs[-1])[0], "checkpoint_committed", {"version": 2})
    verify_store(store, repair=True)
    assert not (roots[1] / manifest_key(LINEAGE, 2)).exists()


# -- reserved derived suffixes in the training and pipeline layers ----------------------------------------------
@pytest.mark.parametrize("lineage", ["exp.steps", "exp.light"])
def test_derived_suffixes_cannot_be_used_by_hand_in_checkpointer_or_pipeline_run(tmp_path: Path, lineage: str) -> None:
    store = _store(_roots(tmp_path), quorum=1)
    with pytest.raises(InvalidNameError, match="reserved"):
        Checkpointer(store, lineage)
    with pytest.raises(InvalidNameError, match="reserved"):
        PipelineRun(store, lineage, pipeline="p", parameters={})
    assert store.lineages() == []


# -- ls of a signing store with one forged lineage ------------------------------------------------------------
def test_ls_lists_the_other_lineages_and_names_the_forged_one(prefect_server, tmp_path: Path) -> None:
    from prefect_recovery import cli

    name, block, roots = _signed_block(tmp_path, "ls-forged", quorum=1)
    for lineage in ("good", "forged"):
        _save(block.core, lineage, lineage, step=1)
    for root in roots:
        path = root / manifest_key("forged", 1)
        raw = json.loads(path.read_bytes())
        raw["step"] = 99
        path.write_bytes(reseal(raw))  # digest recomputed, the signature left: only the signature catches it

    runner = CliRunner()
    as_json = runner.invoke(cli.app, ["ls", "--store", name, "--json"])
    assert as_json.exit_code == 1, as_json.output
    listed = json.loads(as_json.stdout)
    assert [(item["lineage"], item["version"]) for item in listed if "error" not in item] == [("good", 1)]
    [refused] = [item for item in listed if "error" in item]
    assert refused["lineage"] == "forged" and "does not match its content" in refused["error"]

    original_width = cli.console.width
    cli.console.width = 250
    try:
        human = runner.invoke(cli.app, ["ls", "--store", name])
    finally:
        cli.console.width = original_width
    assert human.exit_code == 1
    assert "good" in human.stdout
    assert "forged" in human.output and "does not match its content" in human.output
    assert "Traceback" not in human.output

    only = runner.invoke(cli.app, ["ls", "--store", name, "--lineage", "forged", "--json"])
    assert only.exit_code != 0 and "does not match its content" in json.loads(only.stdout)["error"]
