"""The README's "Your own pipeline" block, extracted and run as a user would (so it cannot drift): a first run
finishes with its final version and state digest in the journal, a second run of the lineage is a finished one,
a fresh lineage run twice gives the same digest (seeded before the model is built), and the registration and
working-directory mistakes of a first-time user get one-line errors that say where the process looked.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import CLI, REPO

from prefect_recovery import CheckpointStore
from prefect_recovery.core.journal import Journal

pytestmark = pytest.mark.slow

MARKER = "<!-- readme-pipeline -->"


def readme_block() -> str:
    text = (REPO / "README.md").read_text()
    match = re.search(re.escape(MARKER) + r"\s*```python\n(.*?)```", text, re.S)
    assert match, "the README lost its tested pipeline block"
    return match.group(1)


@pytest.fixture(scope="module")
def api_url(prefect_server) -> str:
    from prefect.settings import PREFECT_API_URL

    return str(PREFECT_API_URL.value())


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env}
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=300)


def test_the_readme_pipeline_runs_and_recovery_finds_it(tmp_path, api_url):
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_module.py").write_text(readme_block())
    home = project / ".prefect-recovery"
    env = {"PREFECT_API_URL": api_url, "PREFECT_RECOVERY_HOME": ""}  # the default: ./.prefect-recovery
    call = "import my_module; my_module.my_pipeline(lineage='{}')"
    for lineage in ("a", "b"):
        done = run([*CLI[:1], "-c", call.format(lineage)], project, PYTHONPATH=str(project), **env)
        assert done.returncode == 0, done.stderr[-3000:]
    store = CheckpointStore.default(home)
    finals = []
    for lineage in ("a", "b"):
        [finished] = [e for e in Journal(store.core, lineage).events() if e.kind == "run_finished"]
        assert finished.data["final_version"] == store.latest(lineage).version
        finals.append(finished.data["final_digest"])
    assert finals[0] == finals[1], "two runs of one seed differ: the model was not seeded before it was built"
    assert store.latest("a").step == 16 and store.latest("a").metadata["epoch"] == 2

    # recover from the project directory: a finished lineage reports its real final version and digest
    done = run([*CLI, "recover", "--json", "--lineage", "a"], project, PREFECT_RECOVERY_PIPELINES="my_module",
               PYTHONPATH=str(project), **env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    payload = json.loads(done.stdout)
    assert payload["status"] == "finished" and payload["final_digest"] == finals[0], payload

    # from another directory: says where it looked and leaves nothing behind
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = run([*CLI, "recover", "--lineage", "a"], elsewhere, PREFECT_RECOVERY_PIPELINES="my_module", **env)
    assert done.returncode != 0
    assert str(elsewhere / ".prefect-recovery") in done.stderr.replace("\n", "") and "Traceback" not in done.stderr
    assert list(elsewhere.iterdir()) == []


def test_an_unimportable_pipeline_module_is_one_line_saying_where_it_looked(tmp_path, api_url):
    project = tmp_path / "project"
    project.mkdir()
    (project / "my_module.py").write_text(readme_block())
    env = {"PREFECT_API_URL": api_url, "PREFECT_RECOVERY_HOME": ""}
    # a crashed run: killed right after it claimed the lineage (SIGKILL from inside, before any step)
    crash = "import os, signal, my_module\nfrom prefect_recovery import PipelineRun\n" + (
        "orig = PipelineRun.__enter__\n"
        "def enter(self):\n    orig(self); os.kill(os.getpid(), signal.SIGKILL)\n"
        "PipelineRun.__enter__ = enter\nmy_module.my_pipeline(lineage='c')\n"
    )
    done = run([*CLI[:1], "-c", crash], project, PYTHONPATH=str(project), **env)
    assert done.returncode == -9, done.stderr[-2000:]
    # the console script (or any other directory) does not have the project on sys.path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env["PREFECT_RECOVERY_HOME"] = str(project / ".prefect-recovery")
    done = run([*CLI, "recover", "--lineage", "c"], elsewhere, PREFECT_RECOVERY_PIPELINES="my_module", **env)
    assert done.returncode != 0
    assert "ModuleNotFoundError" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "my_module" in done.stderr and "PYTHONPATH" in done.stderr
    # with the module importable, the same recovery finishes the run
    done = run([*CLI, "recover", "--json", "--lineage", "c"], elsewhere, PREFECT_RECOVERY_PIPELINES="my_module",
               PYTHONPATH=str(project), **env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["status"] == "recovered"
