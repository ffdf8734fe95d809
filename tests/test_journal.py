"""The lineage journal (DESIGN.md invariant 8): create-only events over regions, quorum, replay."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from prefect_recovery.core import (
    InvalidNameError,
    LocalRegionIO,
    QuorumNotMetError,
    RegionUnavailableError,
    Store,
    open_region,
)
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.journal import (
    Journal,
    JournalError,
    JournalEvent,
    JournalEventBody,
    decode_event,
)
from prefect_recovery.core.layout import journal_key, journal_prefix, seq_from_journal_name
from prefect_recovery.core.lineage_history import fold_journal
from prefect_recovery.core.manifest import canonical_json


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    paths = []
    for name in names:
        (tmp_path / name).mkdir()
        paths.append(tmp_path / name)
    return paths


def _store(paths: list[Path], quorum: int = 1) -> Store:
    return Store([open_region(str(p)) for p in paths], write_quorum=quorum)


def _event_files(region: Path, lineage: str = "lin") -> list[str]:
    directory = region / journal_prefix(lineage)
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []


def _event(seq: int, kind: str, run_id: str = "run-1", time: str = "2024-01-01T00:00:00+00:00", **data) -> JournalEvent:
    body = JournalEventBody(lineage="lin", seq=seq, kind=kind, run_id=run_id, time=time, data=data)
    return JournalEvent.build(body)


# -- layout ------------------------------------------------------------------------------------


def test_journal_keys():
    assert journal_prefix("lin") == "lineages/lin/journal"
    assert journal_key("lin", 7) == "lineages/lin/journal/000000000007.json"
    assert seq_from_journal_name("000000000007.json") == 7
    for name in ("000000000000.json", "7.json", "000000000007.json.tmp", ".tmp-000000000007.json", "x"):
        assert seq_from_journal_name(name) is None
    for seq in (0, -1, True, 10**12, "3"):
        with pytest.raises(InvalidNameError):
            journal_key("lin", seq)
    with pytest.raises(InvalidNameError):
        journal_prefix("../x")


# -- append and read ---------------------------------------------------------------------------


def test_append_and_read_round_trip_across_two_regions(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    journal = Journal(_store([a, b], quorum=2), "lin")
    first = journal.append("run_started", run_id="run-1", data={"params": {"lr": 0.1}})
    second = journal.append("step_started", run_id="run-1", data={"step": "prepare"})
    third = journal.append("step_completed", run_id="run-1", data={"step": "prepare", "output": "blake3:" + "0" * 64})
    assert [e.seq for e in (first, second, third)] == [1, 2, 3]
    assert _event_files(a) == _event_files(b) == [f"{n:012d}.json" for n in (1, 2, 3)]
    assert (a / journal_key("lin", 2)).read_bytes() == (b / journal_key("lin", 2)).read_bytes() == second.encode()

    fresh = Journal(_store([a, b], quorum=2), "lin")  # another process: nothing but the store
    events = fresh.events()
    assert events == [first, second, third]
    assert events[0].data == {"params": {"lr": 0.1}}
    assert fresh.events(after=2) == [third]
    assert decode_event(second.encode(), "lin", 2) == second


def test_seqs_increase_and_skip_taken_ones(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    journal = Journal(_store([a, b]), "lin")
    seqs = [journal.append("checkpoint_committed", run_id="r", data={"version": n}).seq for n in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    # A writer whose listing was stale loses the arbiter race and takes the next free seq.
    journal.next_seq = lambda: 3  # type: ignore[method-assign]
    assert journal.append("run_finished", run_id="r", data={}).seq == 6


def test_append_rejects_bad_events_before_writing(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    journal = Journal(_store([a, b]), "lin")
    with pytest.raises(JournalError, match="data\\['step'\\]"):
        journal.append("step_started", run_id="r", data={})
    with pytest.raises(JournalError, match="unknown journal event kind"):
        journal.append("exploded", run_id="r", data={})  # type: ignore[arg-type]
    with pytest.raises(JournalError, match="run_id"):
        journal.append("run_started", run_id="", data={})
    with pytest.raises(JournalError, match="not plain JSON"):
        journal.append("failure", run_id="r", data={"loss": float("nan")})
    with pytest.raises(JournalError, match="limit"):
        journal.append("failure", run_id="r", data={"log": "x" * (1 << 20)})
    assert _event_files(a) == _event_files(b) == []


def test_region_down_at_append_time(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    regions = [open_region(str(a)), open_region(str(b))]
    Journal(Store(regions, write_quorum=1), "lin").append("run_started", run_id="r", data={})
    b.rename(tmp_path / "b-gone")  # b is down

    event = Journal(Store(regions, write_quorum=1), "lin").append("failure", run_id="r", data={"step": "train"})
    assert event.seq == 2
    assert _event_files(a) == ["000000000001.json", "000000000002.json"]
    assert [e.seq for e in Journal(Store(regions, write_quorum=1), "lin").events()] == [1, 2]

    with pytest.raises(QuorumNotMetError) as info:
        Journal(Store(regions, write_quorum=2), "lin").append("run_finished", run_id="r", data={})
    assert str(b) in info.value.causes
    assert "does not exist" in str(info.value)
    assert _event_files(a) == ["000000000001.json", "000000000002.json"]  # withdrawn: no event 3

    (tmp_path / "b-gone").rename(b)  # b is back: it missed event 2, which stays committed at quorum 1
    read = Journal(Store(regions, write_quorum=1), "lin").read()
    assert [e.seq for e in read.events] == [1, 2] and not read.uncommitted
    # at quorum 2 event 2 (one copy) never counted
    read = Journal(Store(regions, write_quorum=2), "lin").read()
    assert [e.seq for e in read.events] == [1] and read.uncommitted == [2]


class _RefusesJournal(LocalRegionIO):
    """Lists fine, but every journal write fails, like a region that dies mid-append."""

    def put_if_absent(self, key, data):
        if "/journal/" in key:
            raise RegionUnavailableError(self.name, "connection reset while writing the event")
        return super().put_if_absent(key, data)


@pytest.mark.parametrize("bad_first", [False, True])
def test_append_that_misses_quorum_is_withdrawn(tmp_path, bad_first):
    good, flaky = _dirs(tmp_path, "good", "flaky")
    regions = [open_region(str(good)), _RefusesJournal(str(flaky))]
    if bad_first:
        regions.reverse()
    with pytest.raises(QuorumNotMetError) as info:
        Journal(Store(regions, write_quorum=2), "lin").append("run_started", run_id="r", data={})
    assert "connection reset" in info.value.causes[str(flaky)]
    assert _event_files(good) == _event_files(flaky) == []
    assert Journal(Store(regions, write_quorum=2), "lin").events() == []


def test_no_region_reachable(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b])
    shutil.rmtree(a)
    shutil.rmtree(b)
    with pytest.raises(QuorumNotMetError, match="no region accepted it"):
        Journal(store, "lin").append("run_started", run_id="r", data={})
    with pytest.raises(JournalError, match="no region is reachable"):
        Journal(store, "lin").events()


def test_reading_during_an_outage_keeps_committed_events(tmp_path):
    """Quorum 2 of 3 with one region down at read time: events held by the others still count."""
    a, b, c = _dirs(tmp_path, "a", "b", "c")
    regions = [open_region(str(p)) for p in (a, b, c)]
    journal = Journal(Store(regions, write_quorum=2), "lin")
    journal.append("run_started", run_id="r", data={})
    (b / journal_key("lin", 1)).unlink()  # held by a and c only
    a.rename(tmp_path / "a-gone")
    read = journal.read()
    assert [e.seq for e in read.events] == [1]
    assert list(read.unreachable) == [str(a)]


# -- damage and tampering ----------------------------------------------------------------------


@pytest.mark.parametrize("quorum", [1, 2])
@pytest.mark.parametrize("damaged_region", [0, 1])
def test_corrupt_copy_is_skipped_for_the_intact_one(tmp_path, quorum, damaged_region):
    dirs = _dirs(tmp_path, "a", "b")
    journal = Journal(_store(dirs, quorum=quorum), "lin")
    journal.append("run_started", run_id="r", data={})
    event = journal.append("step_completed", run_id="r", data={"step": "train", "loss": 0.25})
    path = dirs[damaged_region] / journal_key("lin", 2)
    raw = bytearray(path.read_bytes())
    raw[raw.index(b"0.25") + 3] = ord("7")  # bit rot that still parses
    path.write_bytes(bytes(raw))

    read = journal.read()
    assert read.events[1] == event
    assert "event_digest" in read.skipped_copies[2][str(dirs[damaged_region])]
    assert journal.history().completed_steps["train"]["loss"] == 0.25

    other = dirs[1 - damaged_region] / journal_key("lin", 2)  # both copies damaged: a hole, never replayed
    other.write_bytes(b"{truncated")
    with pytest.raises(JournalError, match="event 2 has no intact copy"):
        journal.events()
    assert list(journal.read().lost) == [2]


def test_tampered_event_is_rejected():
    event = _event(3, "step_completed", step="train", output="blake3:" + "1" * 64)
    raw = json.loads(event.encode())
    raw["data"]["output"] = "blake3:" + "2" * 64  # changed data, digest left as it was
    with pytest.raises(JournalError, match="does not match its event_digest"):
        decode_event(canonical_json(raw), "lin", 3)
    raw = json.loads(event.encode())
    raw["kind"] = "failure"
    with pytest.raises(JournalError, match="event_digest"):
        decode_event(canonical_json(raw), "lin", 3)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda raw: raw.update(format="prefect-recovery/manifest"), "not a prefect-recovery journal event"),
        (lambda raw: raw.update(format_version=2), "Upgrade prefect-recovery"),
        (lambda raw: raw.update(kind="exploded"), "schema validation at kind"),
        (lambda raw: raw.update(extra=1), "schema validation at extra"),
        (lambda raw: raw.update(seq="3"), "schema validation at seq"),
        (lambda raw: raw.update(event_digest="md5:abc"), "schema validation at event_digest"),
        (lambda raw: raw.update(lineage="../etc"), "schema validation at lineage"),
    ],
)
def test_malformed_events_are_rejected(mutate, message):
    raw = json.loads(_event(3, "run_started").encode())
    mutate(raw)
    with pytest.raises(JournalError, match=message):
        decode_event(canonical_json(raw), "lin", 3)


def test_undecodable_bytes_are_rejected():
    for data in (b"", b"{", b"\xff\xfe", b'{"format": NaN}', b"[]", b" " * ((1 << 20) + 1)):
        with pytest.raises(JournalError):
            decode_event(data)


def test_recomputed_digest_with_sha256_is_accepted_and_checked():
    body = JournalEventBody(lineage="lin", seq=1, kind="run_started", run_id="r", time="t", data={})
    event = JournalEvent.build(body, "sha256")
    assert event.event_digest == hash_bytes(canonical_json(body.model_dump(mode="json")), "sha256")
    assert decode_event(event.encode(), "lin", 1) == event


def test_event_copied_to_another_lineage_or_seq_is_rejected(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    store = _store([a, b])
    Journal(store, "lin").append("run_started", run_id="r", data={})
    Journal(store, "other").append("run_started", run_id="q", data={})
    data = (a / journal_key("lin", 1)).read_bytes()
    with pytest.raises(JournalError, match="belongs to lineage 'lin', found under 'other'"):
        decode_event(data, "other", 1)
    with pytest.raises(JournalError, match="says seq 1, found as seq 2"):
        decode_event(data, "lin", 2)

    for region in (a, b):  # copied into other's journal as its seq 2: never read as other's event
        (region / journal_key("other", 2)).write_bytes(data)
    read = Journal(store, "other").read()
    assert [(e.seq, e.run_id) for e in read.events] == [(1, "q")]
    assert list(read.lost) == [2]
    with pytest.raises(JournalError, match="belongs to lineage 'lin'"):
        Journal(store, "other").events()


def test_two_writers_at_one_seq_in_different_regions_most_holders_win(tmp_path):
    """Possible only when writers saw different arbiters; the copy held by most regions wins."""
    a, b, c = _dirs(tmp_path, "a", "b", "c")
    mine, theirs = _event(1, "run_started", run_id="mine"), _event(1, "run_started", run_id="theirs")
    (a / journal_prefix("lin")).mkdir(parents=True)
    (b / journal_prefix("lin")).mkdir(parents=True)
    (c / journal_prefix("lin")).mkdir(parents=True)
    (a / journal_key("lin", 1)).write_bytes(theirs.encode())
    (b / journal_key("lin", 1)).write_bytes(mine.encode())
    (c / journal_key("lin", 1)).write_bytes(mine.encode())
    read = Journal(_store([a, b, c], quorum=2), "lin").read()
    assert read.events == [mine]
    assert "a different event" in read.skipped_copies[1][str(a)]
    (c / journal_key("lin", 1)).unlink()  # a tie: the earliest region wins (at quorum 1)
    assert Journal(_store([a, b, c], quorum=1), "lin").events() == [theirs]


# -- concurrency -------------------------------------------------------------------------------


def test_concurrent_appends_get_distinct_seqs_and_none_is_lost(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    journals = [Journal(_store([a, b], quorum=2), "lin") for _ in range(2)]  # two "processes"
    per_thread, threads_per_journal = 12, 3
    barrier = threading.Barrier(len(journals) * threads_per_journal)
    results: list[JournalEvent] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(journal: Journal, name: str) -> None:
        try:
            barrier.wait()
            for n in range(per_thread):
                event = journal.append("checkpoint_committed", run_id=name, data={"n": n})
                with lock:
                    results.append(event)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    names = [f"w{j}-{t}" for j in range(len(journals)) for t in range(threads_per_journal)]
    threads = [threading.Thread(target=work, args=(journals[int(name[1])], name)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors

    total = len(threads) * per_thread
    seqs = [event.seq for event in results]
    assert len(set(seqs)) == total
    events = journals[0].events()
    assert len(events) == total
    assert sorted(results, key=lambda e: e.seq) == events  # every append is read back, as written
    for name in names:
        mine = [e.data["n"] for e in events if e.run_id == name]
        assert mine == sorted(mine)  # one writer's events keep their order
    assert _event_files(a) == _event_files(b)


# -- replay ------------------------------------------------------------------------------------


def test_replay_new():
    history = fold_journal([])
    assert history.status == "new"
    assert history.runs == [] and history.completed_steps == {} and history.last_seq == 0
    assert history.failed_step is None and history.interrupted_step is None and history.last_checkpoint is None


def _pipeline(journal: Journal, run_id: str, steps: list[str]) -> None:
    for step in steps:
        journal.append("step_started", run_id=run_id, data={"step": step})
        journal.append("step_completed", run_id=run_id, data={"step": step, "output": f"out-{step}-{run_id}"})


def test_replay_killed_run_is_running_with_interrupted_step(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    journal = Journal(_store([a, b]), "lin")
    journal.append("run_started", run_id="run-1", data={})
    _pipeline(journal, "run-1", ["prepare"])
    journal.append("step_started", run_id="run-1", data={"step": "train"})
    journal.append(
        "checkpoint_committed",
        run_id="run-1",
        data={"version": 3, "step": 300, "trigger": "every_n_steps", "regions": [str(a), str(b)]},
    )
    # SIGKILL here: no failure event
    history = journal.history()
    assert history.status == "running"
    assert history.interrupted_step == "train"
    assert history.failed_step is None
    assert list(history.completed_steps) == ["prepare"]
    assert history.last_checkpoint == {
        "version": 3,
        "step": 300,
        "trigger": "every_n_steps",
        "regions": [str(a), str(b)],
    }
    assert history.runs == ["run-1"] and history.current_run == "run-1"
    assert history.last_seq == 5


def test_replay_failed_then_recovered_and_finished(tmp_path):
    a, b = _dirs(tmp_path, "a", "b")
    journal = Journal(_store([a, b]), "lin")
    journal.append("run_started", run_id="run-1", data={})
    _pipeline(journal, "run-1", ["prepare"])
    journal.append("step_started", run_id="run-1", data={"step": "train"})
    journal.append("checkpoint_committed", run_id="run-1", data={"version": 1, "step": 100})
    journal.append("failure", run_id="run-1", data={"step": "train", "error": "CUDA error: device lost"})
    history = journal.history()
    assert history.status == "failed"
    assert history.failed_step == "train"
    assert history.interrupted_step == "train"
    assert history.recoveries == []

    journal.append("recovery_started", run_id="rec-1", data={"from_version": 1, "resume_step": "train"})
    assert journal.history().status == "failed"  # recovering: the failed run has not finished
    assert journal.history().recoveries[0].finished is None
    journal.append("recovery_finished", run_id="rec-1", data={"restored_version": 1})
    journal.append("run_started", run_id="run-2", data={"resumed_from": 1})
    history = journal.history()
    assert history.status == "running"
    assert history.failed_step is None and history.interrupted_step is None  # a new run
    _pipeline(journal, "run-2", ["train", "evaluate"])
    journal.append("checkpoint_committed", run_id="run-2", data={"version": 2, "step": 200})
    journal.append("run_finished", run_id="run-2", data={})

    history = journal.history()
    assert history.status == "finished"
    assert history.runs == ["run-1", "run-2"] and history.current_run == "run-2"
    assert history.completed_steps == {
        "prepare": {"step": "prepare", "output": "out-prepare-run-1"},
        "train": {"step": "train", "output": "out-train-run-2"},
        "evaluate": {"step": "evaluate", "output": "out-evaluate-run-2"},
    }
    assert history.last_checkpoint == {"version": 2, "step": 200}
    assert history.interrupted_step is None and history.failed_step is None
    [recovery] = history.recoveries
    assert recovery.run_id == "rec-1"
    assert recovery.started == {"from_version": 1, "resume_step": "train"}
    assert recovery.finished == {"restored_version": 1}
    assert recovery.started_seq < recovery.finished_seq


def test_replay_orders_by_seq_not_time():
    # Clocks disagree: times run backwards and jump around, seq is the only order.
    events = [
        _event(1, "run_started", time="2030-01-01T00:00:00+00:00"),
        _event(2, "step_started", time="2020-01-01T00:00:00+00:00", step="train"),
        _event(3, "failure", time="1999-01-01T00:00:00+00:00", step="train"),
        _event(4, "run_started", run_id="run-2", time="2001-01-01T00:00:00+00:00"),
        _event(5, "step_started", run_id="run-2", time="1970-01-01T00:00:00+00:00", step="train"),
        _event(6, "step_completed", run_id="run-2", time="2025-06-01T00:00:00+00:00", step="train", v=1),
        _event(7, "checkpoint_committed", run_id="run-2", time="2000-01-01T00:00:00+00:00", version=9),
        _event(8, "checkpoint_committed", run_id="run-2", time="2099-01-01T00:00:00+00:00", version=10),
    ]
    shuffled = [events[i] for i in (7, 2, 0, 5, 3, 6, 1, 4)]
    history = fold_journal(shuffled)
    assert history.status == "running"
    assert history.runs == ["run-1", "run-2"]
    assert history.failed_step is None  # the failure belongs to run-1, before run-2 started
    assert history.completed_steps == {"train": {"step": "train", "v": 1}}
    assert history.interrupted_step is None
    assert history.last_checkpoint == {"version": 10}  # seq 7 has the later time, seq 8 wins
    assert fold_journal(events[:3]).status == "failed"
    assert fold_journal([*events[:3], _event(9, "run_finished")]).status == "finished"


def test_replay_edge_cases():
    assert fold_journal([_event(1, "checkpoint_committed", version=1)]).status == "running"  # no run_started
    # a failure after run_finished: the run failed
    assert fold_journal([_event(1, "run_started"), _event(2, "run_finished"), _event(3, "failure")]).status == "failed"
    # run_finished after failure: finished, and nothing is interrupted
    history = fold_journal(
        [_event(1, "run_started"), _event(2, "step_started", step="s"), _event(3, "failure"), _event(4, "run_finished")]
    )
    assert history.status == "finished" and history.interrupted_step is None
    # parallel steps: the last started one that did not complete
    history = fold_journal(
        [
            _event(1, "run_started"),
            _event(2, "step_started", step="a"),
            _event(3, "step_started", step="b"),
            _event(4, "step_completed", step="b"),
        ]
    )
    assert history.interrupted_step == "a"
    # a recovery_finished whose recovery_started never committed is still recorded
    assert [r.model_dump() for r in fold_journal([_event(5, "recovery_finished", run_id="rec")]).recoveries] == [
        {"run_id": "rec", "started_seq": None, "started": None, "finished_seq": 5, "finished": {}}
    ]
    with pytest.raises(JournalError, match="two events under one seq"):
        fold_journal([_event(1, "run_started"), _event(1, "run_finished")])
    other = JournalEvent.build(JournalEventBody(lineage="x", seq=2, kind="run_started", run_id="r", time="t"))
    with pytest.raises(JournalError, match="several lineages"):
        fold_journal([_event(1, "run_started"), other])


def test_lineage_history_answers_writer_finish_resume_floor_and_claims(tmp_path):
    """The typed history (core/lineage_history.py) answers the questions recover, replay-check, retention
    and the pipeline runtime used to answer by walking raw events."""
    journal = Journal(_store(_dirs(tmp_path, "r")), "lin")
    journal.append("run_started", run_id="run-1", data={"pipeline": "p", "parameters": {"steps": 4}})
    journal.append("checkpoint_committed", run_id="run-1", data={"version": 1, "step": 2})
    journal.append("failure", run_id="run-1", data={"step": "train"})
    history = journal.history()
    assert history.unfinished and not history.finished and history.final is None
    assert history.writer_of(1).run_id == "run-1" and history.writer_of(1).parameters == {"steps": 4}
    assert history.resume_floor(latest=1) == 1
    assert history.claims == []  # a final failure ends the run's claim

    journal.append("recovery_started", run_id="rec-1", data={"checkpoint": {"version": 1}})
    journal.append("run_started", run_id="run-2", data={"pipeline": "p", "resume_version": 1, "recovery_run": "rec-1"})
    journal.append("checkpoint_committed", run_id="run-2", data={"version": 2, "step": 4})
    history = journal.history()
    assert [claim.run_id for claim in history.claims] == ["rec-1", "run-2"]
    assert history.claims[1].parent == "rec-1"
    assert history.resume_floor(latest=2) == 1  # an unfinished recovery pinned v1: retention keeps it
    assert history.writer_of(2).run_id == "run-2" and history.writer_of(99).run_id == "run-2"
    assert history.current_run_start.resume_version == 1 and history.recoveries[0].checkpoint_version == 1

    journal.append("run_finished", run_id="run-2", data={"final_version": 2, "final_digest": "d"})
    journal.append("recovery_finished", run_id="rec-1", data={})
    history = journal.history()
    assert history.finished and not history.unfinished and history.claims == []
    assert history.final == {"final_version": 2, "final_digest": "d"}
    assert history.resume_floor(latest=2) is None
