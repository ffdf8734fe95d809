"""Bad input to the command line is one line saying what to do, exit 2, and no traceback unless ``--debug``
(issue 12, class 13); local region directories are created on purpose, by ``mkdir -p`` or
``prefect-recovery init``, and an empty mount is told apart from a new region (class 14).

Run as a user runs it: ``python -m prefect_recovery.cli`` in a subprocess, real directories.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch
from conftest import CLI

from prefect_recovery import CheckpointStore


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env if env is not None else dict(os.environ)
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """Exit ``code``, no traceback, and one line on stderr (``error: ...``); returns that line."""
    output = result.stdout + result.stderr
    assert result.returncode == code, f"rc={result.returncode}\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{result.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def saved_lineage(root: Path, lineage: str = "run") -> list[str]:
    """A one-region store under ``root`` with one checkpoint of ``lineage``; its --region arguments."""
    region = root / "region"
    region.mkdir(parents=True)
    CheckpointStore(regions=[str(region)]).save({"w": torch.arange(8.0)}, lineage=lineage, step=1)
    return ["--region", str(region)]


# -- class 13: bad input --------------------------------------------------------------------------------------
def test_an_unparsable_region_url_is_a_one_line_error():
    line = assert_one_line_error(run_cli("ls", "--region", "http://[::1/x"))
    assert "--region" in line and "URL" in line


def test_quorum_zero_is_a_one_line_error(tmp_path):
    line = assert_one_line_error(run_cli("ls", "--region", str(tmp_path), "--quorum", "0"))
    assert "--quorum" in line


def test_quorum_above_the_number_of_regions_is_a_one_line_error(tmp_path):
    line = assert_one_line_error(run_cli("ls", "--region", str(tmp_path), "--quorum", "3"))
    assert "--quorum" in line
    as_json = run_cli("ls", "--region", str(tmp_path), "--quorum", "3", "--json")
    assert as_json.returncode == 2 and "--quorum" in json.loads(as_json.stdout)["error"]


def test_usage_errors_are_one_line_too():
    line = assert_one_line_error(run_cli("ls", "--no-such-option"))
    assert "--no-such-option" in line and "--help" in line
    line = assert_one_line_error(run_cli("export", "--to", "x"))  # --lineage missing
    assert "--lineage" in line


def test_bare_command_still_shows_help():
    result = run_cli()
    assert "Usage" in result.stdout + result.stderr and "Traceback" not in result.stdout + result.stderr


def test_export_to_an_existing_file_is_refused(tmp_path):
    args = saved_lineage(tmp_path)
    target = tmp_path / "a-file"
    target.write_text("keep me")
    line = assert_one_line_error(run_cli("export", "--lineage", "run", "--to", str(target), *args))
    assert str(target) in line
    assert target.read_text() == "keep me"


def test_export_to_an_unwritable_path_is_a_one_line_error(tmp_path):
    args = saved_lineage(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = assert_one_line_error(run_cli("export", "--lineage", "run", "--to", str(blocker / "sub"), *args))
    assert str(blocker / "sub") in line
    as_json = run_cli("export", "--lineage", "run", "--to", str(blocker / "sub"), "--json", *args)
    assert as_json.returncode == 2 and "Traceback" not in as_json.stdout + as_json.stderr
    assert str(blocker / "sub") in json.loads(as_json.stdout)["error"]


def test_export_into_a_non_empty_directory_needs_force(tmp_path):
    args = saved_lineage(tmp_path)
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    line = assert_one_line_error(run_cli("export", "--lineage", "run", "--to", str(target), *args))
    assert "--force" in line
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]

    forced = run_cli("export", "--lineage", "run", "--to", str(target), "--force", *args)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert (target / "tensors.safetensors").is_file() and (target / "notes.txt").read_text() == "mine"


def test_export_into_a_new_or_empty_directory_needs_no_force(tmp_path):
    args = saved_lineage(tmp_path)
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new" / "deeper"):
        result = run_cli("export", "--lineage", "run", "--to", str(target), *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (target / "state.json").is_file()


def test_plot_under_a_file_is_a_one_line_error(tmp_path):
    pytest.importorskip("matplotlib")
    args = saved_lineage(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = assert_one_line_error(run_cli("ls", "--lineage", "run", "--plot", str(blocker / "t.png"), *args))
    assert str(blocker / "t.png") in line


def test_recover_of_an_unknown_lineage_is_one_line_without_starting_a_flow(tmp_path):
    args = saved_lineage(tmp_path, "known")
    result = run_cli("recover", "--lineage", f"nope-{uuid.uuid4().hex[:6]}", *args)
    line = assert_one_line_error(result)
    assert "prefect-recovery ls" in line
    assert "temporary server" not in result.stdout + result.stderr  # refused before any flow run


def test_debug_shows_the_traceback():
    result = run_cli("--debug", "ls", "--region", "http://[::1/x")
    assert result.returncode != 0
    assert "Traceback" in result.stderr


def test_a_long_error_stays_on_one_line(tmp_path):
    missing = tmp_path / ("deep-" * 20) / "region"
    line = assert_one_line_error(run_cli("ls", "--region", str(missing)))
    assert str(missing) in line


# -- class 14: local region directories -----------------------------------------------------------------------
def test_a_missing_region_directory_says_how_to_create_it(tmp_path):
    missing = tmp_path / "ckpt"
    line = assert_one_line_error(run_cli("ls", "--region", str(missing)))
    assert f"mkdir -p {missing}" in line and f"prefect-recovery init --region {missing}" in line
    assert not missing.exists()
    # A save says the same, and creates nothing.
    with pytest.raises(Exception, match="mkdir -p"):
        CheckpointStore(regions=[str(missing)]).save({"w": torch.zeros(2)}, lineage="x", step=1)
    assert not missing.exists()


def test_init_creates_the_region_and_its_marker_and_is_idempotent(tmp_path):
    region = tmp_path / "mnt" / "ckpt"
    first = run_cli("init", "--region", str(region), "--json")
    assert first.returncode == 0, first.stdout + first.stderr
    marker = region / "prefect-recovery-region.json"
    assert marker.is_file()
    record = json.loads(marker.read_text())
    assert record["format"] == "prefect-recovery-region" and record["region_id"]
    assert json.loads(first.stdout)[0]["created"] is True

    again = run_cli("init", "--region", str(region), "--json")
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout)[0]["created"] is False
    assert json.loads(marker.read_text()) == record  # never rewritten

    store = CheckpointStore(regions=[str(region)])
    store.save({"w": torch.arange(4.0)}, lineage="r", step=1)
    assert torch.equal(store.load(lineage="r")["w"], torch.arange(4.0))
    verified = run_cli("verify", "--region", str(region), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr  # the marker is part of the layout


def test_an_empty_mount_point_is_told_apart_from_a_new_region(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
    store = CheckpointStore(regions=[str(a), str(b)], write_quorum=1, straggler_grace_seconds=None)
    store.save({"w": torch.arange(4.0)}, lineage="r", step=1)
    assert any((b / "lineages").iterdir())

    # The disk behind b is not mounted: its mount point is an empty directory on the root disk.
    for child in sorted(b.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    assert b.is_dir() and not any(b.iterdir())

    again = CheckpointStore(regions=[str(a), str(b)], write_quorum=1, straggler_grace_seconds=None)
    info = again.save({"w": torch.arange(5.0)}, lineage="r", step=2)
    assert str(b) in info.lagging and "init" in info.lagging[str(b)], info.lagging
    assert not any(b.iterdir()), "nothing may be written onto the empty mount point"
    report = again.verify(repair=True)
    assert not any(b.iterdir()), "repair must not copy the store onto the root disk"
    problems = [p for p in report.problems if p.region == str(b)]
    assert problems and problems[0].kind == "unreachable region" and "mount" in problems[0].detail

    # Once the operator says it is a new region, it is one.
    result = run_cli("init", "--region", str(b))
    assert result.returncode == 0, result.stdout + result.stderr
    healed = CheckpointStore(regions=[str(a), str(b)], write_quorum=1)
    assert healed.verify(repair=True).healthy
    assert (b / "lineages").is_dir()


def test_a_new_store_of_empty_directories_needs_no_init(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for path in (a, b):
        path.mkdir()
    info = CheckpointStore(regions=[str(a), str(b)], write_quorum=2).save({"w": torch.zeros(3)}, lineage="n", step=1)
    assert sorted(info.regions) == sorted([str(a), str(b)]) and not info.lagging


def test_the_default_store_initialises_its_regions(recovery_home):
    CheckpointStore.default()
    for name in ("region-a", "region-b"):
        assert (recovery_home / "regions" / name / "prefect-recovery-region.json").is_file()
