"""A recovery storm on production-shaped Prefect: how long from crash to recovered, and where the time goes.

The stack of tests/test_production.py (tests/helpers/production_stack.py): a Prefect server on a fresh
PostgreSQL database, a process work pool, two workers, the user's SensorFit pipeline deployed from
tests/production/prefect.yaml, ``prefect-recovery automations install --deployment sensorfit/production``, and
the recover deployment's concurrency limit (2, prefect.yaml) throttling recoveries. In one run:

* ``single``: one run crashed alone (SIGKILL of its flow-run process), the baseline;
* ``storm``: ``--lineages`` runs (default 20) crashed at the same instant.

Each recovery is split into detection, trigger, queue, start, preflight, resume, training and finish
(tests/helpers/storm.py says what each one measures), and every recovered lineage's final state digest is
compared with an uninterrupted run's.

    python benchmarks/storm.py --json [--lineages 20] [--pace SECONDS]

``--pace`` (seconds per optimizer step of the runs that crash; recoveries train at full speed) defaults to
0.25 s per lineage, at least 1 s: all runs start at once on the same cores and must all be mid-training when
the last one commits its first checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from helpers.production_stack import CODE, PIPELINE_DEPLOYMENT, STORE_BLOCK, production_stack  # noqa: E402
from helpers.storm import STORM_PACE, crash_storm, final_digest, store_of, summary  # noqa: E402

SEED, EPOCHS = 0, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lineages", type=int, default=20)
    parser.add_argument("--pace", type=float, default=None, help="seconds per optimizer step")
    parser.add_argument("--zombie-after", type=int, default=60)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    args = parser.parse_args()
    args.pace = args.pace if args.pace is not None else max(STORM_PACE, 0.25 * args.lineages)

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="storm-") as tmp, production_stack(Path(tmp)) as stack:
        up = time.monotonic() - started

        def cli(*command: str, cwd: Path = stack.tmp) -> None:
            done = subprocess.run(command, capture_output=True, text=True, env=stack.env(), cwd=cwd, timeout=900)
            if done.returncode != 0:
                raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")

        cli(sys.executable, "-m", "sensorfit.pipeline", "reference", str(SEED), str(EPOCHS), STORE_BLOCK, cwd=CODE)
        cli(sys.executable, "-m", "prefect_recovery.cli", "automations", "install", "--json",
            "--deployment", PIPELINE_DEPLOYMENT, "--zombie-after", str(args.zombie_after))  # fmt: skip
        store = store_of(stack)
        expected = final_digest(store, "reference")
        result: dict = {"stack_startup_s": round(up, 1)}
        for name, size in (("single", 1), ("storm", args.lineages)):
            lineages = [f"{name}-{i}" for i in range(size)]
            crashes = crash_storm(stack, lineages, seed=SEED, epochs=EPOCHS, pace=args.pace, timeout=args.timeout)
            result[name] = summary(crashes)
            result[name]["bit_identical"] = sum(final_digest(store, c.lineage) == expected for c in crashes)
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    result["setup"] = {"pace_s": args.pace, "epochs": EPOCHS, "steps": EPOCHS * 12, "recover_concurrency_limit": 2,
                       "workers": 2, "zombie_after_s": args.zombie_after}  # fmt: skip
    if not args.json:
        for name in ("single", "storm"):
            part = result[name]
            print(f"{name}: {part['lineages']} lineages, crash->recovered {part['crash_to_recovered_s']}, "
                  f"phases (median) {part['phase_median_s']}")  # fmt: skip
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
