"""The ``prefect-recovery`` command line, run as a user runs it: subprocesses, exit codes, JSON output.

The embedded default store lives under ``$PREFECT_RECOVERY_HOME``; the autouse ``recovery_home`` fixture
points it at a fresh directory per test and subprocesses inherit it through ``os.environ``. ``demo`` runs
once per module; tests that need its checkpoint get a private copy of that home.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import CLI
from helpers.rounding import fail_if_rounding
from safetensors.torch import load_file

from prefect_recovery import CheckpointStore
from prefect_recovery.core.layout import blob_key


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=300, env=env if env is not None else dict(os.environ)
    )


def json_of(result: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(result.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON (rc={result.returncode}):\nstdout: {result.stdout}\nstderr: {result.stderr}")


def assert_clean_failure(result: subprocess.CompletedProcess[str]) -> str:
    """A non-zero exit with a message for humans, not a Python traceback."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "Traceback" not in output, output
    assert output.strip(), "no message at all"
    return output


DEMO_STEPS = "20"


def api_env(**extra: str) -> dict[str, str]:
    """os.environ plus the harness server's API URL (so flows run by the CLI report there)."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url, "the prefect_server fixture should have set an API URL"
    return {**os.environ, "PREFECT_API_URL": url, **extra}


@pytest.fixture(scope="module")
def demo_run(prefect_server, tmp_path_factory: pytest.TempPathFactory):
    """One ``demo`` run (a short example pipeline) into a module-wide home: (home, payload, result)."""
    home = tmp_path_factory.mktemp("demo-home")
    result = run_cli("demo", "--steps", DEMO_STEPS, "--json", env=api_env(PREFECT_RECOVERY_HOME=str(home)))
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return home, json_of(result), result


@pytest.fixture
def demo_home(demo_run, recovery_home: Path) -> Path:
    """This test's ``$PREFECT_RECOVERY_HOME``, holding a private copy of the demo's checkpoints."""
    shutil.copytree(demo_run[0], recovery_home)
    return recovery_home


def blob_files(region: Path) -> list[Path]:
    return sorted(p for p in (region / "blobs").rglob("*") if p.is_file())


# -- demo / ls -------------------------------------------------------------------------------------------
def test_demo_completes_and_checkpoints_in_both_regions(demo_run) -> None:
    home, payload, _result = demo_run
    assert payload["status"] == "completed"
    assert payload["lineage"] == "demo"
    assert payload["resumed_from"] is None
    assert isinstance(payload["final_version"], int) and payload["final_version"] >= 1
    assert payload["final_digest"].startswith("blake3:")
    final_manifest = f"{payload['final_version']:012d}.json"
    for region in (home / "regions" / "region-a", home / "regions" / "region-b"):
        assert blob_files(region)
        assert (region / "lineages" / "demo" / "manifests" / final_manifest).is_file()


def test_demo_again_reports_the_finished_lineage(demo_run, demo_home: Path) -> None:
    _home, first, _ = demo_run
    result = run_cli("demo", "--steps", DEMO_STEPS, "--json", env=api_env())
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    again = json_of(result)
    assert again["status"] == "finished"
    assert (again["final_version"], again["final_digest"]) == (first["final_version"], first["final_digest"])


def test_demo_is_bit_identical_across_runs(demo_run, recovery_home: Path) -> None:
    _home, first, _ = demo_run
    result = run_cli("demo", "--steps", DEMO_STEPS, "--json", env=api_env())  # a fresh, empty home
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    second = json_of(result)
    assert second["status"] == "completed"
    if second["final_digest"] != first["final_digest"]:  # issue 18's divergence is reported with its figures
        fail_if_rounding("demo-again", (demo_run[0], "demo"), (recovery_home, "demo"))
    assert second["final_digest"] == first["final_digest"]


def test_ls_lists_the_saved_checkpoints(demo_run, demo_home: Path) -> None:
    _home, demo, _ = demo_run
    result = run_cli("ls", "--lineage", "demo", "--json")
    assert result.returncode == 0, result.stderr
    infos = json_of(result)
    assert infos, "no checkpoints listed"
    assert {info["lineage"] for info in infos} == {"demo"}
    assert [info["version"] for info in infos] == sorted(info["version"] for info in infos)
    final = infos[-1]
    assert final["version"] == demo["final_version"]
    assert final["step"] == int(DEMO_STEPS)
    assert final["metadata"]["final"] is True
    assert final["regions"] == [str(demo_home / "regions" / "region-a"), str(demo_home / "regions" / "region-b")]
    assert final["lagging"] == {}
    assert final["total_bytes"] > 0

    everything = json_of(run_cli("ls", "--json"))
    assert "demo" in {info["lineage"] for info in everything}


def test_history_shows_the_journal_of_a_finished_run(demo_run, demo_home: Path) -> None:
    result = run_cli("history", "--lineage", "demo", "--json")
    assert result.returncode == 0, result.stderr
    report = json_of(result)
    kinds = [event["kind"] for event in report["events"]]
    assert kinds[0] == "run_started" and kinds[-1] == "run_finished"
    assert [e["seq"] for e in report["events"]] == sorted(e["seq"] for e in report["events"])
    steps = [e["data"]["step"] for e in report["events"] if e["kind"] == "step_completed"]
    assert steps == ["prepare-data", "train", "evaluate", "finalize"]
    committed = [e["data"]["version"] for e in report["events"] if e["kind"] == "checkpoint_committed"]
    heavy_versions = [i["version"] for i in json_of(run_cli("ls", "--lineage", "demo", "--json"))]
    assert committed == heavy_versions[: len(committed)] and committed  # every heavy save of the run, in order
    summary = report["summary"]
    assert summary["status"] == "finished"
    assert summary["interrupted_step"] is None
    assert set(summary["completed_steps"]) == {"prepare-data", "train", "evaluate", "finalize"}
    final = report["events"][-1]["data"]
    assert final["final_digest"] == demo_run[1]["final_digest"]

    human = run_cli("history", "--lineage", "demo")
    assert human.returncode == 0 and "status: finished" in human.stdout


def test_ls_on_an_empty_home(recovery_home: Path) -> None:
    result = run_cli("ls", "--json")
    assert result.returncode == 0, result.stderr
    assert json_of(result) == []


# -- verify / repair -----------------------------------------------------------------------------------------
def test_verify_right_after_demo_is_healthy(demo_home: Path) -> None:
    result = run_cli("verify", "--json")
    report = json_of(result)
    assert result.returncode == 0, report["problems"][:3]
    assert report["healthy"] is True


def test_verify_finds_a_flipped_byte_and_repair_heals_it(demo_home: Path) -> None:
    healthy = run_cli("verify", "--lineage", "demo", "--json")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    report = json_of(healthy)
    assert report["healthy"] is True
    assert report["problems"] == []
    assert report["blobs"] > 0

    region_a = demo_home / "regions" / "region-a"
    region_b = demo_home / "regions" / "region-b"
    manifest, _holders = CheckpointStore.default().core.resolve("demo")
    chunk = max((c for e in manifest.entries for c in e.chunks), key=lambda c: c.size)
    key = blob_key(chunk.digest)
    victim = region_a / key
    good = victim.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))

    broken = run_cli("verify", "--lineage", "demo", "--json")
    assert broken.returncode == 1, broken.stdout + broken.stderr
    report = json_of(broken)
    assert report["healthy"] is False
    [problem] = report["problems"]
    assert problem["region"] == str(region_a)
    assert problem["object"] == key
    assert problem["kind"] == "corrupt"
    assert problem["repaired"] is False

    repaired = run_cli("verify", "--lineage", "demo", "--repair", "--json")
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    report = json_of(repaired)
    assert report["healthy"] is True
    assert [(p["region"], p["object"], p["repaired"]) for p in report["problems"]] == [(str(region_a), key, True)]
    assert victim.read_bytes() == good == (region_b / key).read_bytes()

    again = run_cli("verify", "--lineage", "demo", "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json_of(again)["problems"] == []


def test_verify_human_output_names_the_problem(demo_home: Path) -> None:
    manifest, _holders = CheckpointStore.default().core.resolve("demo")
    key = blob_key(manifest.entries[0].chunks[0].digest)
    (demo_home / "regions" / "region-b" / key).unlink()
    result = run_cli("verify", "--lineage", "demo")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "problems remain" in result.stdout
    assert "missing" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


# -- export ---------------------------------------------------------------------------------------------------
def _tensor_leaves(node: Any, value: Any, found: dict[str, Any]) -> dict[str, Any]:
    """Pair each ``{"tensor": NAME}`` leaf of a state tree with the loaded value."""
    if isinstance(node, dict) and len(node) == 1:
        ((tag, body),) = node.items()
        if tag == "tensor":
            found[body] = value
        elif tag == "dict":
            for key, child in body:
                _tensor_leaves(child, value[key], found)
        elif tag in ("list", "tuple"):
            for index, child in enumerate(body):
                _tensor_leaves(child, value[index], found)
    return found


def test_export_writes_safetensors_and_state_json(demo_run, demo_home: Path, tmp_path: Path) -> None:
    out = tmp_path / "exported"
    result = run_cli("export", "--lineage", "demo", "--to", str(out), "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json_of(result)
    assert summary["version"] == demo_run[1]["final_version"]
    assert sorted(summary["files"]) == sorted([str(out / "tensors.safetensors"), str(out / "state.json")])

    document = json.loads((out / "state.json").read_text())
    assert (document["lineage"], document["version"]) == ("demo", summary["version"])
    assert document["step"] == int(DEMO_STEPS)
    assert document["metadata"]["final"] is True

    exported = load_file(str(out / "tensors.safetensors"))
    stored = CheckpointStore.default().load(lineage="demo")
    expected = _tensor_leaves(document["tree"], stored, {})
    assert set(exported) == set(expected)
    assert len(exported) == summary["tensors"]
    assert any(name.startswith("model/") for name in exported)
    assert any(name.startswith("optimizer/") for name in exported)
    for name, tensor in expected.items():
        if name in document["raw_tensors"]:  # a dtype safetensors lacks: raw bytes + dtype/shape in state.json
            raw = document["raw_tensors"][name]
            assert (raw["dtype"], raw["shape"]) == (str(tensor.dtype).removeprefix("torch."), list(tensor.shape))
            assert torch.equal(exported[name], tensor.reshape(-1).view(torch.uint8)), name
            continue
        assert exported[name].dtype == tensor.dtype, name
        assert exported[name].shape == tensor.shape, name
        assert torch.equal(exported[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)), name


def test_export_and_ls_with_explicit_regions(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    state = {
        "bf16": torch.randn(3, 4).to(torch.bfloat16),
        "c128": torch.randn(5, dtype=torch.complex128),  # not a safetensors dtype: exported raw
        "empty": torch.empty(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "opt": {0: {"step": torch.tensor(2.0)}},
        "blob": b"\x00\x01binary",
        "lr": 0.25,
    }
    CheckpointStore(regions=[str(a), str(b)]).save(state, lineage="explicit", step=9)

    listed = run_cli("ls", "--region", str(a), "--region", str(b), "--json")
    assert listed.returncode == 0, listed.stderr
    [info] = json_of(listed)
    assert (info["lineage"], info["step"], info["regions"]) == ("explicit", 9, [str(a), str(b)])

    out = tmp_path / "out"
    result = run_cli("export", "--lineage", "explicit", "--to", str(out), "--region", str(a), "--region", str(b))
    assert result.returncode == 0, result.stdout + result.stderr
    exported = load_file(str(out / "tensors.safetensors"))
    document = json.loads((out / "state.json").read_text())

    assert torch.equal(exported["bf16"], state["bf16"])
    assert exported["empty"].shape == (0, 3)
    assert exported["scalar"].shape == () and exported["scalar"].item() == 7
    assert torch.equal(exported["opt/#0/step"], torch.tensor(2.0))
    raw = document["raw_tensors"]["c128"]
    assert raw == {"dtype": "complex128", "shape": [5]}
    rebuilt = exported["c128"].view(getattr(torch, raw["dtype"])).reshape(raw["shape"])
    assert torch.equal(rebuilt, state["c128"])
    assert [base64.b64decode(v) for v in document["bytes"].values()] == [b"\x00\x01binary"]
    assert document["step"] == 9


def test_export_of_unknown_lineage_fails_cleanly(recovery_home: Path, tmp_path: Path) -> None:
    result = run_cli("export", "--lineage", "nothing-here", "--to", str(tmp_path / "x"), "--json")
    output = assert_clean_failure(result)
    assert "nothing-here" in json_of(result)["error"], output
    assert not (tmp_path / "x" / "tensors.safetensors").exists()


# -- errors ----------------------------------------------------------------------------------------------------
def test_nonexistent_region_export_and_verify_fail_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    args = ["--region", str(missing), "--region", str(tmp_path / "also-missing"), "--json"]

    exported = run_cli("export", "--lineage", "demo", "--to", str(tmp_path / "out"), *args)
    assert_clean_failure(exported)
    assert str(missing) in json_of(exported)["error"]

    verified = run_cli("verify", *args)
    assert verified.returncode == 1, verified.stdout + verified.stderr
    report = json_of(verified)
    assert report["healthy"] is False
    unreachable = {p["region"]: p for p in report["problems"] if p["kind"] == "unreachable region"}
    assert str(missing) in unreachable
    assert "does not exist" in unreachable[str(missing)]["detail"]
    assert not missing.exists()  # a read-only command does not create regions


def test_nonexistent_region_ls_fails_cleanly(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    result = run_cli("ls", "--region", str(missing), "--region", str(tmp_path / "also-missing"), "--json")
    output = assert_clean_failure(result)
    assert str(missing) in output


def test_bad_lineage_is_a_clear_error(recovery_home: Path) -> None:
    human = run_cli("ls", "--lineage", "bad/../name")
    output = assert_clean_failure(human)
    assert "invalid lineage" in output

    as_json = run_cli("ls", "--lineage", "bad/../name", "--json")
    assert_clean_failure(as_json)
    assert "invalid lineage" in json_of(as_json)["error"]


def test_region_and_store_together_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli("ls", "--region", str(tmp_path), "--store", "whatever")
    output = assert_clean_failure(result)
    assert "--region" in output and "--store" in output


def test_ls_with_a_saved_block(prefect_server, demo_home: Path) -> None:
    name = f"cli-{uuid.uuid4().hex[:10]}"
    CheckpointStore.default().save(name)
    other_home = demo_home.parent / "elsewhere"  # the block, not $PREFECT_RECOVERY_HOME, says where regions are
    env = api_env(PREFECT_RECOVERY_HOME=str(other_home))

    listed = run_cli("ls", "--store", name, "--json", env=env)
    assert listed.returncode == 0, listed.stdout + listed.stderr
    assert "demo" in {info["lineage"] for info in json_of(listed)}
    assert not other_home.exists()


def test_unknown_store_block_is_a_clear_error(prefect_server, recovery_home: Path) -> None:
    result = run_cli("ls", "--store", "no-such-block", "--json", env=api_env())
    output = assert_clean_failure(result)
    assert "no-such-block" in output
