"""Run ``tests/dist_train.py`` under torchrun and compare what its ranks ended with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent
SCRIPT = TESTS / "dist_train.py"
TIMEOUT = 240


def rank_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(
            ("DIST_KILL", "PREFECT_RECOVERY_LINEAGE", "PREFECT_RECOVERY_RESUME", "PREFECT_RECOVERY_RUN")
        )
    }
    env.update(
        PREFECT_RECOVERY_HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    )
    env.update(extra)
    return env


def prepare_home(home: Path) -> None:
    """Create the embedded store's regions once, before several ranks open them."""
    code = "import sys; from prefect_recovery.blocks import CheckpointStore; CheckpointStore.default(sys.argv[1])"
    subprocess.run([sys.executable, "-c", code, str(home)], check=True, cwd=REPO, env=rank_env(home), timeout=120)


def torchrun(
    home: Path, logs: Path, name: str, *, nproc: int, args: list[str], env: dict[str, str] | None = None
) -> tuple[int, dict[int, int], str]:
    """Run the script on ``nproc`` ranks; (torchrun's exit status, every rank's exit code, output)."""
    logs.mkdir(parents=True, exist_ok=True)
    codes = logs / f"{name}.codes.json"
    command = [sys.executable, "-m", "prefect_recovery.distributed.torchrun", str(codes), "--standalone",
               f"--nproc-per-node={nproc}", "--tee=3", f"--log-dir={logs / name}", str(SCRIPT), *args]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=rank_env(home, **(env or {})), capture_output=True, text=True,
                            timeout=TIMEOUT)  # fmt: skip
    output = result.stdout + result.stderr
    (logs / f"{name}.log").write_text(output)
    exit_codes = {int(k): v for k, v in json.loads(codes.read_text()).items()} if codes.exists() else {}
    return result.returncode, exit_codes, output


def run_ok(home: Path, logs: Path, name: str, *, nproc: int, args: list[str], env: dict[str, str] | None = None) -> str:
    code, exit_codes, output = torchrun(home, logs, name, nproc=nproc, args=args, env=env)
    assert code == 0, f"{name} failed {exit_codes}:\n{output[-6000:]}"
    return output


def dumps(directory: Path) -> dict[int, dict[str, Any]]:
    found = sorted(directory.glob("rank*.pt"))
    return {int(path.stem[4:]): torch.load(path, weights_only=False) for path in found}


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where two nested states differ (tensors bit for bit, dtype and shape included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return [f"{path}: tensor vs {type(b).__name__}"]
        if (
            a.dtype != b.dtype
            or a.shape != b.shape
            or not torch.equal(
                a.view(-1).view(torch.uint8) if a.numel() else a, b.view(-1).view(torch.uint8) if b.numel() else b
            )
        ):
            return [f"{path}: tensors differ"]
        return []
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: missing on one side" for k in set(a) ^ set(b)]
        for key in a.keys() & b.keys():
            out += differences(a[key], b[key], f"{path}/{key}")
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{path}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True)) for d in differences(x, y, f"{path}/{i}")]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


TRAINED = (
    "step",
    "epoch",
    "model_full",
    "optimizer_full",
    "model_local",
    "scheduler",
    "rng_now",
    "data_now",
    "threads",
)


def assert_same_training(reference: dict[int, dict[str, Any]], other: dict[int, dict[str, Any]]) -> None:
    """Every rank ended with bit-identical state (what it trained, not how it got there)."""
    assert sorted(reference) == sorted(other), (sorted(reference), sorted(other))
    for rank in reference:
        found = [d for key in TRAINED for d in differences(reference[rank][key], other[rank][key], f"rank{rank}/{key}")]
        assert found == [], found
