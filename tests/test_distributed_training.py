"""The Checkpointer inside torchrun, and a ``@step`` that runs the torchrun job (issue 14).

Real processes: every job is ``torchrun`` (through ``prefect_recovery.distributed.torchrun``) running
``tests/dist_train.py`` on 2 or 4 gloo ranks on CPU, DDP or FSDP2, a small MLP with dropout and noise
drawn from every RNG of every rank. Each rank dumps what it ended with (local shards, full model and
optimizer, RNG, data position), and the tests compare dumps bit for bit:

* DDP, 2 ranks: one rank SIGKILLed mid-training inside the pipeline's ``train`` step
  (``tests/dist_pipeline.py``, a user-style pipeline), recovered with ``prefect-recovery recover``
  (the CLI, another process): every rank ends bit-identical to an uninterrupted job;
* FSDP2, 2 ranks: the same, recovered by the ``recover`` flow in this process; the ranks' output is in the
  ``train`` task run's log with their rank, and the step's error names every rank's exit code;
* a rank SIGKILLed while its blobs are being written: the previous version stays latest, and the
  recovery is still bit-identical;
* SIGTERM (a preemption notice) on one rank: every rank writes the emergency checkpoint at the same
  step and exits as ``Preempted``; the resumed job is bit-identical;
* resume 4 -> 2, 2 -> 4 and 2 -> 1 ranks (FSDP2): model and optimizer equal to the saved ones after resharding,
  the data position continues at the global cursor, ranks that existed keep their RNG, new ranks seed
  theirs from the seed and their rank (with a warning), and the recorded thread count is applied;
  a data position that cannot be re-split (torch's ``DistributedSampler``) is refused with the fix.

About 15 torchrun jobs, each test marked ``slow``; the file takes about 6 minutes on an idle 2-core machine
(measured 4:45 before the SIGTERM and one-rank jobs were added), up to 10 under load.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import dist_pipeline
import pytest
import torch
from conftest import CLI, REPO
from helpers.dist_jobs import TESTS, assert_same_training, differences, dumps, prepare_home, run_ok, torchrun

from prefect_recovery.core.journal import Journal
from prefect_recovery.distributed.launch import RanksFailedError
from prefect_recovery.distributed.rank_state import derived_seed

SEED, SAMPLES, BATCH = 7, 96, 4  # dist_train.py's defaults
REFERENCES: dict[str, Path] = {}


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def reference(mode: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 2-rank job (its home keeps the store, ``dump`` what every rank ended with)."""
    if mode not in REFERENCES:
        base = tmp_path_factory.mktemp(f"reference-{mode}")
        prepare_home(base / "home")
        run_ok(base / "home", base / "logs", "reference", nproc=2,
               args=["--lineage", "ref", "--mode", mode, "--dump", str(base / "dump")])  # fmt: skip
        REFERENCES[mode] = base
    return REFERENCES[mode]


def pipeline_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIST_KILL", "PREFECT_RECOVERY_LINEAGE"))}
    env.update(
        PREFECT_RECOVERY_HOME=str(home),
        PREFECT_API_URL=api_url,
        PREFECT_RECOVERY_PIPELINES="dist_pipeline",
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
        **extra,
    )
    return env


def journal(home: Path, lineage: str) -> list[Any]:
    from prefect_recovery import CheckpointStore

    return Journal(CheckpointStore.default(home).core, lineage).events()


def latest(home: Path, lineage: str) -> Any:
    from prefect_recovery import CheckpointStore

    return CheckpointStore.default(home).latest(lineage)


# -- kill a rank, recover, compare ------------------------------------------------------------------
@pytest.mark.slow
def test_ddp_rank_killed_mid_training_is_recovered_by_the_cli_bit_identically(api_url, tmp_path, tmp_path_factory):
    expected = dumps(reference("ddp", tmp_path_factory) / "dump")
    home, dump = tmp_path / "home", tmp_path / "dump"
    prepare_home(home)
    env = pipeline_env(home, api_url)
    command = [sys.executable, "-m", "dist_pipeline", "run", str(dump), "ddp"]
    killed = subprocess.run(
        command, cwd=REPO, env={**env, "DIST_KILL_AT": "1:10"}, capture_output=True, text=True, timeout=300
    )
    output = killed.stdout + killed.stderr
    assert killed.returncode != 0, output[-4000:]
    assert "rank 1 killed by signal 9 (SIGKILL)" in output, output[-4000:]
    assert "[rank 0]" in output and "[rank 1]" in output  # the ranks' lines, in the task run's log
    failures = [e for e in journal(home, "run") if e.kind == "failure" and e.data.get("step") == "train"]
    assert failures and "RanksFailedError" in failures[-1].data["error"]
    before = latest(home, "run")
    assert before is not None and before.step < 20 and before.metadata["distributed"]["world_size"] == 2
    assert not dump.exists()  # the killed job never finished
    light = latest(home, "run.light")  # light saves go through DCP too, to the first region
    assert light.step % 3 == 0 and light.metadata["tier"] == "light" and len(light.regions) == 1

    recovered = subprocess.run([*CLI, "recover", "--json", "--lineage", "run"], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    assert recovered.returncode == 0, (recovered.stdout + recovered.stderr)[-4000:]
    payload = json.loads(recovered.stdout)
    assert payload["status"] == "recovered" and payload["resumed_from"]["version"] == before.version, payload
    got = dumps(dump)
    assert all(d["resumed_from"]["version"] == before.version for d in got.values())
    assert_same_training(expected, got)
    commits = [e for e in journal(home, "run") if e.kind == "checkpoint_committed"]
    assert commits and commits[-1].data["version"] == latest(home, "run").version  # rank 0 journaled its commits


@pytest.mark.slow
def test_fsdp2_rank_killed_mid_training_is_recovered_by_the_flow_bit_identically(
    api_url, tmp_path, tmp_path_factory, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    from prefect_recovery.flows.recover import recover

    expected = dumps(reference("fsdp", tmp_path_factory) / "dump")
    home, dump = tmp_path / "home", tmp_path / "dump"
    prepare_home(home)
    monkeypatch.setenv("PREFECT_RECOVERY_HOME", str(home))
    monkeypatch.setenv("DIST_KILL_AT", "1:10")
    state = dist_pipeline.dist_pipeline(lineage="fsdp", dump=str(dump), mode="fsdp", return_state=True)
    with pytest.raises(RanksFailedError) as failed:
        state.result()
    assert failed.value.exit_codes[1] == -9 and failed.value.signals[1] == 9, failed.value.exit_codes
    assert failed.value.exit_codes[0] != 0 and set(failed.value.exit_codes) == {0, 1}
    assert "rank 1 killed by signal 9 (SIGKILL)" in str(failed.value)
    assert "prefect-recovery recover --lineage fsdp" in str(failed.value)
    APILogWorker.drain_all(timeout=30)
    logs, query = [], LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        while page := client.read_logs(query, limit=200, offset=len(logs)):
            logs += page
    rank_lines = {log.message.split("]")[0] for log in logs if log.message.startswith("[rank ") and log.task_run_id}
    assert rank_lines == {"[rank 0", "[rank 1"}, rank_lines

    monkeypatch.delenv("DIST_KILL_AT")
    before = latest(home, "fsdp")
    result = recover(lineage="fsdp")
    assert result["status"] == "recovered" and result["resumed_from"]["version"] == before.version, result
    assert_same_training(expected, dumps(dump))


@pytest.mark.slow
def test_rank_killed_while_writing_its_blobs_leaves_the_previous_version_latest(
    api_url, tmp_path, tmp_path_factory, monkeypatch
):
    from prefect_recovery.flows.recover import recover

    expected = dumps(reference("ddp", tmp_path_factory) / "dump")
    home, dump = tmp_path / "home", tmp_path / "dump"
    prepare_home(home)
    monkeypatch.setenv("PREFECT_RECOVERY_HOME", str(home))
    monkeypatch.setenv("DIST_KILL_IN_SAVE", "1:3")  # saves at steps 4 and 8 commit; rank 1 dies inside the 3rd
    with pytest.raises(RanksFailedError) as failed:
        dist_pipeline.dist_pipeline(lineage="midsave", dump=str(dump), mode="ddp")
    assert failed.value.exit_codes[1] == -9, failed.value.exit_codes
    before = latest(home, "midsave")
    assert (before.version, before.step) == (2, 8), before  # the save at step 12 never committed
    monkeypatch.delenv("DIST_KILL_IN_SAVE")
    result = recover(lineage="midsave")
    assert result["status"] == "recovered" and result["resumed_from"] == {"version": 2, "step": 8}, result
    assert_same_training(expected, dumps(dump))


@pytest.mark.slow
def test_sigterm_on_one_rank_makes_every_rank_save_at_the_same_step_and_resume_bit_identically(
    tmp_path, tmp_path_factory
):
    expected = dumps(reference("ddp", tmp_path_factory) / "dump")
    home, logs = tmp_path / "home", tmp_path / "logs"
    prepare_home(home)
    args = ["--lineage", "ref", "--mode", "ddp", "--dump", str(tmp_path / "dump")]
    code, exit_codes, output = torchrun(home, logs, "preempted", nproc=2, args=args, env={"DIST_SIGTERM_AT": "1:6"})
    # Preempted exits 143; a rank still leaving when another has exited may get torchrun's SIGTERM (-15)
    assert code != 0 and 143 in exit_codes.values() and set(exit_codes.values()) <= {143, -15}, exit_codes
    assert output.count("writing an emergency checkpoint at step 7") == 2  # rank 0 too, at the same step
    emergency = latest(home, "ref")
    assert (emergency.step, emergency.metadata["trigger"]) == (7, "emergency")
    run_ok(home, logs, "resumed", nproc=2, args=args)
    got = dumps(tmp_path / "dump")
    assert got[0]["resumed_from"] == {"version": emergency.version, "step": 7}
    assert_same_training(expected, got)


# -- another world size --------------------------------------------------------------------------
def epoch_order(epoch: int) -> list[int]:
    return torch.randperm(SAMPLES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()


def rng_seeded(seed: int) -> torch.Tensor:
    return torch.Generator().manual_seed(seed).get_state()


def check_resharded(saved: dict[int, dict[str, Any]], restored: dict[int, dict[str, Any]]) -> None:
    """Model and optimizer equal to the saved ones; the data cursor and the RNG rule of DISTRIBUTED.md."""
    saved_world, world = len(saved), len(restored)
    cursor, epoch = saved[0]["data_now"]["cursor"], saved[0]["data_now"]["epoch"]
    assert 0 < cursor < SAMPLES  # saved mid-epoch: the cursor matters
    order = epoch_order(epoch)
    for rank, got in restored.items():
        assert got["saved_world"] == saved_world and got["world"] == world
        assert got["step"] == saved[0]["step"]
        for key in ("model_full", "optimizer_full", "scheduler"):
            assert differences(saved[0][key], got[key], key) == []
        assert got["next_batch"] == order[cursor + rank * BATCH : cursor + (rank + 1) * BATCH]
        if rank < saved_world:
            assert torch.equal(got["rng_at_restore"]["torch"], saved[rank]["rng_now"]), f"rank {rank} RNG"
        else:
            assert torch.equal(got["rng_at_restore"]["torch"], rng_seeded(derived_seed(SEED + rank, rank)))
        assert got["threads"] == 1  # the recorded setting, though this job started with OMP_NUM_THREADS=2


@pytest.mark.slow
def test_resume_4_to_2_ranks_reshards_and_continues_the_global_data_cursor(tmp_path):
    home, logs = tmp_path / "home", tmp_path / "logs"
    prepare_home(home)
    run_ok(home, logs, "four", nproc=4, args=["--lineage", "w", "--mode", "fsdp", "--max-steps", "5", "--every", "2",
                                              "--dump", str(tmp_path / "four")])  # fmt: skip
    saved = dumps(tmp_path / "four")
    assert saved[0]["data_now"]["cursor"] == 5 * 4 * BATCH
    args = ["--lineage", "w", "--mode", "fsdp", "--restore-only", "--dump", str(tmp_path / "two")]
    run_ok(home, logs, "two", nproc=2, args=args, env={"OMP_NUM_THREADS": "2"})
    check_resharded(saved, dumps(tmp_path / "two"))


@pytest.mark.slow
def test_resume_2_to_4_and_1_ranks_derives_the_rng_of_new_ranks_with_a_warning(tmp_path, tmp_path_factory):
    base = reference("fsdp", tmp_path_factory)
    home = tmp_path / "home"
    shutil.copytree(base / "home", home)
    args = ["--lineage", "ref", "--mode", "fsdp", "--restore-only", "--dump", str(tmp_path / "four")]
    output = run_ok(home, tmp_path / "logs", "four", nproc=4, args=args, env={"OMP_NUM_THREADS": "2"})
    check_resharded(dumps(base / "dump"), dumps(tmp_path / "four"))
    assert "rank 2 did not exist" in output and "rank 3 did not exist" in output
    assert "rank 0 did not exist" not in output
    # and on one rank: a one-rank job asks for the distributed Checkpointer (distributed=True)
    args = ["--lineage", "ref", "--mode", "fsdp", "--restore-only", "--distributed", "--dump", str(tmp_path / "one")]
    run_ok(home, tmp_path / "logs", "one", nproc=1, args=args, env={"OMP_NUM_THREADS": "2"})
    check_resharded(dumps(base / "dump"), dumps(tmp_path / "one"))


@pytest.mark.slow
def test_a_data_position_that_cannot_be_re_split_is_refused_at_another_world_size(tmp_path, tmp_path_factory):
    home = tmp_path / "home"
    shutil.copytree(reference("ddp", tmp_path_factory) / "home", home)
    args = ["--lineage", "ref", "--restore-only", "--distributed", "--plain-sampler", "--dump", str(tmp_path / "d")]
    code, exit_codes, output = torchrun(home, tmp_path / "logs", "plain", nproc=1, args=args)
    assert code != 0 and exit_codes == {0: 1}, exit_codes
    assert "WorldSizeChangeError" in output and "written by 2 ranks and this job has 1" in output
    assert "DistributedResumableSampler" in output  # the fix


@pytest.mark.slow
def test_a_single_process_checkpoint_is_refused_by_ranks_with_the_reason(tmp_path):
    from prefect_recovery import CheckpointStore

    home = tmp_path / "home"
    prepare_home(home)
    CheckpointStore.default(home).save_checkpoint({"model": {"w": torch.zeros(2)}}, lineage="single", step=1)
    args = ["--lineage", "single", "--restore-only", "--dump", str(tmp_path / "d")]
    code, exit_codes, output = torchrun(home, tmp_path / "logs", "single", nproc=2, args=args)
    assert code != 0 and 1 in exit_codes.values(), exit_codes  # a rank raised (torchrun may stop the other first)
    assert "was written by a single process" in output


# -- the parts, in this process (no torchrun) ---------------------------------------------------------
def units(sampler: Any, rounds: int) -> list[list[int]]:
    iterator = iter(sampler)
    return [next(iterator) for _ in range(rounds)]


def test_the_sampler_continues_the_epoch_at_the_global_cursor_at_any_world_size():
    from prefect_recovery.distributed.sampler import DistributedResumableSampler

    order = epoch_order(0)
    four = [DistributedResumableSampler(SAMPLES, seed=SEED, batch_size=BATCH, rank=r, world_size=4) for r in range(4)]
    taken = [unit for sampler in four for unit in units(sampler, 3)]  # 3 rounds on 4 ranks
    assert sorted(i for unit in taken for i in unit) == sorted(order[: 3 * 4 * BATCH])
    state = four[0].state_dict()
    assert state["cursor"] == 3 * 4 * BATCH and all(s.state_dict() == state | {"world_size": 4} for s in four)
    for world in (2, 3):  # resumed on another number of ranks: the rest of the epoch, each sample once
        ranks = [DistributedResumableSampler(SAMPLES, seed=SEED, batch_size=BATCH, rank=r, world_size=world)
                 for r in range(world)]  # fmt: skip
        for sampler in ranks:
            sampler.load_state_dict(state)
        rest = [i for sampler in ranks for unit in sampler for i in unit]
        assert set(rest) == set(order[3 * 4 * BATCH :])  # nothing skipped, nothing of the epoch repeated...
        assert len(rest) - len(order[3 * 4 * BATCH :]) < world * BATCH  # ...but the last round's wrap-around


def test_state_split_for_dcp_round_trips_without_pickle():
    from prefect_recovery.distributed.rank_state import join_state, split_state, tensor_keys, tree_of, tree_tensor

    state = {"rng": (3, tuple(range(5)), None), "lr": [0.1, float("-inf")], 7: {"t": torch.arange(3)}, "b": b"\x00\x01"}
    tree, tensors = split_state(state, "ranks/1")
    assert set(tensors) == set(tensor_keys(tree)) == {"ranks/1/#7/t", "ranks/1/b"}
    again = tree_of(tree_tensor(tree))
    assert again == tree
    restored = join_state(again, tensors)
    assert restored["rng"] == state["rng"] and restored["lr"] == state["lr"] and restored["b"] == state["b"]
    assert torch.equal(restored[7]["t"], state[7]["t"])


def test_the_rank_context_is_the_launchers_hand_over(tmp_path):
    from prefect_recovery import CheckpointStore
    from prefect_recovery.distributed.context import launch_environment, rank_context

    env = launch_environment("exp", resume_version=3, run_id="run-1", store_block=None)
    context = rank_context({**env, "RANK": "1", "WORLD_SIZE": "4"})
    assert (context.lineage, context.resume_version, context.run_id, context.rank, context.world_size) == (
        "exp", 3, "run-1", 1, 4)  # fmt: skip
    point = context.resume_point(CheckpointStore.default(tmp_path))
    assert (point.lineage, point.version) == ("exp", 3) and point.on_commit is not None
    assert rank_context({}).resume_point(None) is None


def test_exit_codes_are_described_with_their_signal():
    from prefect_recovery.distributed.launch import describe_exit

    assert describe_exit(-9) == "killed by signal 9 (SIGKILL)"
    assert describe_exit(0) == "exited 0" and describe_exit(1) == "exit code 1"


def test_two_distributed_checkpoints_of_the_same_state_have_the_same_state_digest(tmp_path):
    import torch.distributed.checkpoint as dcp

    from prefect_recovery import CheckpointStore
    from prefect_recovery.distributed import dcp_writer
    from prefect_recovery.tasks.pipeline_run import state_digest

    store = CheckpointStore.default(tmp_path)
    for _ in range(2):
        dcp.save({"w": torch.arange(4.0)}, storage_writer=dcp_writer(store, "same", step=1), no_dist=True)
    assert state_digest(store, "same", 1) == state_digest(store, "same", 2)
