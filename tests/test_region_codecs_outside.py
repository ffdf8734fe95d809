"""Per-region codecs (issue 17, FORMAT.md "Region codecs") tried from outside, as a user and as a
hostile reviewer would, without the author's tests in mind.

Three regions with three codecs (raw, zstd, auto) behind a write quorum of 2, one of them down
while a save runs; the CLI as a subprocess on such a store (a block saved on a real Prefect
server, and plain --region flags); a Checkpointer run SIGKILLed mid-save and resumed from each
region alone; delta fine-tune chains through retention and GC; a region's codec changed between
saves; hand-written manifests whose ``forms`` lie; the store as Prefect result storage, DCP saves
through its writer, and an export after the raw region was deleted. Real local regions, real
processes, the same load path a restore takes; every committed version must stay loadable, bad
input must be a typed error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from prefect_recovery import CheckpointStore
from prefect_recovery.core import CheckpointError, Store, open_region
from prefect_recovery.core.digest import hash_bytes
from prefect_recovery.core.layout import blob_key, manifest_key
from prefect_recovery.core.manifest import ChunkRef, canonical_json
from prefect_recovery.core.region_codecs import select_form
from prefect_recovery.core.retention import RetentionPolicy
from prefect_recovery.training.state_io import load_state, save_state

CHUNK = 64 * 1024
CLI = [sys.executable, "-m", "prefect_recovery.cli"]
THREE = {"raw": "none", "zs": "zstd", "au": "auto"}


# -- helpers ---------------------------------------------------------------------------------------------


def _block(root: Path, codecs: dict[str, str], quorum: int = 1, **kw: Any) -> CheckpointStore:
    """A block over local regions ``root/<name>`` with ``region_codecs`` keyed by URL."""
    for name in codecs:
        (root / name).mkdir(parents=True, exist_ok=True)
    urls = {name: str(root / name) for name in codecs}
    return CheckpointStore(
        regions=list(urls.values()),
        write_quorum=quorum,
        region_codecs={urls[name]: codec for name, codec in codecs.items()},
        chunk_bytes=CHUNK,
        straggler_grace_seconds=None,
        **kw,
    )


def _alone(root: Path, name: str, codec: str = "none") -> Store:
    return Store([open_region(str(root / name))], chunk_bytes=CHUNK, codec=codec)  # type: ignore[arg-type]


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _weights(n: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def _nudge(t: torch.Tensor, seed: int) -> torch.Tensor:
    """A fine-tune step: every value moves by about one unit of its last place."""
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed))
    scale = 1e-2 if t.dtype in (torch.bfloat16, torch.float16) else 1e-6
    return (t.double() * (1 + scale * noise)).to(t.dtype)


def _state(seed: int) -> dict[str, Any]:
    """Weights that compress (bf16, fp32), indices that compress a lot, noise that does not."""
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": _weights(150_000, seed), "w32": _weights(40_000, seed + 1, torch.float32)},
        "index": torch.arange(30_000, dtype=torch.int64) + seed,
        "noise": torch.randint(0, 256, (90_000,), generator=g, dtype=torch.uint8),
        "step": seed,
        "note": f"state {seed}",
    }


def _flat(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flat(value, f"{prefix}/{key}").items()}
    return {prefix: state}


def _assert_equal(got: Any, expected: Any) -> None:
    got_flat, want_flat = _flat(got), _flat(expected)
    assert set(got_flat) == set(want_flat)
    for name, value in want_flat.items():
        if isinstance(value, torch.Tensor):
            assert _same(got_flat[name], value), name
        else:
            assert got_flat[name] == value, name


def _chunks(store: Store, lineage: str, version: int | None = None) -> list[ChunkRef]:
    manifest = store.resolve(lineage, version)[0]
    return [chunk for entry in store.manifest_entries(manifest) for chunk in entry.chunks]


def _blob_names(region: Path) -> set[str]:
    return {p.name for p in (region / "blobs").rglob("*") if p.is_file() and not p.name.startswith(".tmp-")}


def _blob_bytes(region: Path) -> int:
    return sum(p.stat().st_size for p in (region / "blobs").rglob("*") if p.is_file())


def _age_blobs(root: Path, seconds: float = 3 * 3600) -> None:
    """Make every blob older than the GC grace (the audit keeps younger unreferenced blobs)."""
    old = time.time() - seconds
    for path in root.rglob("blobs/*/*/*"):
        os.utime(path, (old, old))


def _cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=environment, cwd=cwd)


# -- three regions, three codecs, quorum 2, one region down during the save -----------------------------------


@pytest.mark.parametrize("delta", [False, True], ids=["whole", "delta"])
@pytest.mark.parametrize("down", list(THREE))
def test_a_region_down_during_a_save_gets_its_own_codecs_form_from_repair(tmp_path, down, delta):
    block = _block(tmp_path, THREE, quorum=2, delta=delta)
    first, second = _finetune(2, 2) if delta else (_state(1), _state(2))
    assert block.save_checkpoint(first, lineage="run").version == 1
    os.rename(tmp_path / down, tmp_path / f"{down}.off")  # unmounted while the save runs
    info = block.save_checkpoint(second, lineage="run")
    assert info.version == 2 and down in Path(next(iter(info.lagging))).name
    assert sorted(Path(r).name for r in info.regions) == sorted(set(THREE) - {down})
    os.rename(tmp_path / f"{down}.off", tmp_path / down)
    before = _blob_names(tmp_path / down)

    # Verify names what the returned region lacks; repair heals it in its own codec.
    found = block.verify()
    assert not found.healthy
    assert {Path(p.region).name for p in found.problems} == {down}
    healed = block.verify(repair=True)
    assert all(p.repaired for p in healed.problems), healed.problems
    assert block.verify(decode=True).healthy

    # The region now holds exactly the form its codec selects of each chunk of version 2,
    # and nothing of the forms other codecs select.
    chunks = _chunks(block.core, "run", 2)
    mine = {d.split(":")[1] for c in chunks for d, _ in select_form(c, THREE[down]).form_blobs()}
    everything = {d.split(":")[1] for c in chunks for d, _ in c.blobs()}
    added = _blob_names(tmp_path / down) - before
    assert mine - before <= added and added <= mine, (THREE[down], len(mine), len(added))
    assert not (everything - mine) & added
    if THREE[down] != "none":
        assert any(c.forms for c in chunks)  # the store really keeps several forms
        if delta:  # and the returned region got deltas on its own forms of version 1's chunks
            assert any(select_form(c, THREE[down]).parent is not None for c in chunks)

    # Every region alone serves both versions bit for bit, the returned one included.
    for name in THREE:
        for version, state in ((1, first), (2, second)):
            _assert_equal(load_state(_alone(tmp_path, name), lineage="run", version=version)[0], state)
    # The compressed regions hold fewer bytes than the raw one.
    assert _blob_bytes(tmp_path / "au") < _blob_bytes(tmp_path / "raw")
    assert _blob_bytes(tmp_path / "zs") < _blob_bytes(tmp_path / "raw")


# -- the CLI, as a user runs it, on a store with region codecs ----------------------------------------------------


def test_the_cli_on_a_saved_block_with_region_codecs_inits_lists_verifies_repairs_audits_exports(
    prefect_server, tmp_path
):
    from prefect.settings import PREFECT_API_URL

    env = {"PREFECT_API_URL": str(PREFECT_API_URL.value())}
    urls = {name: str(tmp_path / name) for name in THREE}
    name = f"mixed-{uuid.uuid4().hex[:10]}"
    CheckpointStore(
        regions=list(urls.values()),
        write_quorum=2,
        region_codecs={urls[n]: c for n, c in THREE.items()},
        chunk_bytes=CHUNK,
        retention=RetentionPolicy(keep_last=2),
    ).save(name)
    # init creates every region of the block (none exists yet); running it again changes nothing.
    created = _cli("init", "--store", name, "--json", env=env)
    assert created.returncode == 0, created.stdout + created.stderr
    assert all((tmp_path / n / "prefect-recovery-region.json").is_file() for n in THREE)
    assert _cli("init", "--store", name, "--json", env=env).returncode == 0
    block = CheckpointStore.load(name)
    states = [_state(seed) for seed in range(1, 5)]
    for number, state in enumerate(states, 1):
        assert block.save_checkpoint(state, lineage="cli", step=number).version == number

    listed = _cli("ls", "--store", name, "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [row["version"] for row in json.loads(listed.stdout) if row["lineage"] == "cli"] == [1, 2, 3, 4]
    for flags in ([], ["--decode"]):
        verified = _cli("verify", "--store", name, *flags, "--json", env=env)
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert json.loads(verified.stdout)["healthy"] is True

    # Damage: the auto region loses a blob of its own form, the raw region gets a flipped byte.
    chunks = _chunks(block.core, "cli", 4)
    multi = next(c for c in chunks if c.forms and select_form(c, "auto").codec is not None)
    auto_digest = select_form(multi, "auto").digest
    raw_digest = select_form(multi, "none").digest
    (tmp_path / "au" / blob_key(auto_digest)).unlink()
    raw_path = tmp_path / "raw" / blob_key(raw_digest)
    data = bytearray(raw_path.read_bytes())
    data[7] ^= 1
    raw_path.write_bytes(bytes(data))
    found = _cli("verify", "--store", name, "--json", env=env)
    assert found.returncode == 1, found.stdout + found.stderr
    problems = {(Path(p["region"]).name, p["object"], p["kind"]) for p in json.loads(found.stdout)["problems"]}
    assert problems == {("au", blob_key(auto_digest), "missing"), ("raw", blob_key(raw_digest), "corrupt")}
    repaired = _cli("verify", "--store", name, "--repair", "--json", env=env)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert (tmp_path / "au" / blob_key(auto_digest)).is_file()
    assert hash_bytes(raw_path.read_bytes(), "blake3") == raw_digest
    assert json.loads(_cli("verify", "--store", name, "--json", env=env).stdout)["healthy"] is True

    # The audit applies the block's retention (keep_last=2) and sweeps what only versions 1-2 named.
    _age_blobs(tmp_path)
    audited = _cli("audit", "--store", name, "--json", env=env)
    assert audited.returncode == 0, audited.stdout + audited.stderr
    assert sorted(block.core.versions("cli")) == [3, 4]
    for region in THREE:
        for version in (3, 4):
            _assert_equal(load_state(_alone(tmp_path, region), lineage="cli", version=version)[0], states[version - 1])

    out = tmp_path / "export"
    exported = _cli(
        "export", "--store", name, "--lineage", "cli", "--version", "3", "--to", str(out), "--json", env=env
    )
    assert exported.returncode == 0, exported.stdout + exported.stderr
    tensors = load_file(str(out / "tensors.safetensors"))
    want = [t for t in _flat(states[2]).values() if isinstance(t, torch.Tensor)]
    assert sorted(_bits(t) for t in tensors.values()) == sorted(_bits(t) for t in want)
    history = _cli("history", "--store", name, "--lineage", "cli", "--json", env=env)
    assert history.returncode == 0, history.stdout + history.stderr
    # A block name the server does not know: one line, no traceback.
    bad = _cli("verify", "--store", "no-such-block-" + uuid.uuid4().hex[:6], "--json", env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr + bad.stdout


def test_verify_with_region_flags_on_a_healthy_mixed_store_finds_nothing_and_repair_writes_nothing(tmp_path):
    """--region flags cannot know each region's codec: --region-codec REGION=CODEC says it (as the block's
    region_codecs do), and verify/repair/audit then expect each region's own form."""
    block = _block(tmp_path, THREE, quorum=3)
    block.save_checkpoint(_state(1), lineage="flags")
    assert block.verify().healthy
    sizes = {name: _blob_bytes(tmp_path / name) for name in THREE}
    flags = [arg for name in THREE for arg in ("--region", str(tmp_path / name))]
    flags += [arg for name, codec in THREE.items() for arg in ("--region-codec", f"{tmp_path / name}={codec}")]
    found = _cli("verify", *flags, "--json")
    assert json.loads(found.stdout)["problems"] == [], found.stdout[:2000]
    _cli("verify", *flags, "--repair", "--json")
    audited = _cli("audit", *flags, "--no-retention", "--json")
    assert json.loads(audited.stdout)["healthy"] is True, audited.stdout[:2000]
    assert {name: _blob_bytes(tmp_path / name) for name in THREE} == sizes
    # A mistyped codec or a codec for a region not given: one line, exit 2, nothing written.
    for bad in (f"{tmp_path / 'zs'}=gzip", f"{tmp_path / 'elsewhere'}=auto", "auto"):
        refused = _cli("verify", *flags[:6], "--region-codec", bad, "--repair")
        assert refused.returncode == 2 and "--region" in refused.stderr, refused.stderr
    assert {name: _blob_bytes(tmp_path / name) for name in THREE} == sizes


# -- a Checkpointer run on a mixed store, SIGKILLed mid-save, resumed from each region alone ---------------------

TRAIN = Path(__file__).parent / "helpers" / "mixed_codec_train.py"


def _train(out: Path, regions: dict[Path, str], delta: bool = False) -> subprocess.Popen[str]:
    args = [sys.executable, str(TRAIN), str(out), *(f"{path}={codec}" for path, codec in regions.items())]
    env = {**os.environ, "MIXED_CODEC_DELTA": "1" if delta else "0"}
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env
    )


def _finish(process: subprocess.Popen[str]) -> str:
    try:
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The final state of the training run never interrupted (on one raw region: the codecs do not
    change the training)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "raw").mkdir()
    _finish(_train(root / "final.pt", {root / "raw": "none"}))
    return torch.load(root / "final.pt")


@pytest.mark.parametrize("delta", [False, True], ids=["whole", "delta"])
def test_a_checkpointer_run_killed_mid_save_resumes_bit_identical_from_each_region_alone(
    tmp_path, uninterrupted, delta
):
    expected = uninterrupted
    crashed = tmp_path / "crashed"
    codecs = {crashed / name: codec for name, codec in THREE.items()}
    for path in codecs:
        path.mkdir(parents=True)
    process = _train(tmp_path / "never.pt", codecs, delta)
    try:
        assert process.stdout is not None
        for _ in range(12):  # step 12 started a heavy save (async): the kill lands while it writes
            assert process.stdout.readline() == "step\n"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL

    for name, codec in THREE.items():
        alone = tmp_path / f"only-{name}"
        shutil.copytree(crashed / name, alone / name)
        out = tmp_path / f"resumed-{name}.pt"
        _finish(_train(out, {alone / name: codec}, delta))
        got = torch.load(out)
        for part in ("model", "optimizer"):
            want_flat = {k: v for k, v in _flat(expected[part]).items() if isinstance(v, torch.Tensor)}
            got_flat = {k: v for k, v in _flat(got[part]).items() if isinstance(v, torch.Tensor)}
            assert want_flat.keys() == got_flat.keys()
            assert all(_same(got_flat[k], want_flat[k]) for k in want_flat), (name, part)
    # The crashed store itself: every committed version loads from each region alone, verified.
    block = _block(crashed, THREE, quorum=2)
    versions = sorted(block.core.versions("mixed-run"))
    assert versions, "no heavy checkpoint committed before the kill"
    if delta:  # the compressed regions really hold deltas, the raw one whole chunks
        chunks = _chunks(block.core, "mixed-run", versions[-1])
        assert any(select_form(c, "auto").parent is not None for c in chunks)
        assert all(select_form(c, "none").parent is None for c in chunks)
    for name in THREE:
        for version in versions:
            load_state(_alone(crashed, name), lineage="mixed-run", version=version)


@pytest.mark.parametrize("codecs", [{"zs": "zstd"}, {"raw": "none", "zs": "zstd"}], ids=["zstd-store", "mixed"])
def test_a_256_kib_tensor_loads_from_a_zstd_region(tmp_path, codecs):
    for name in codecs:
        (tmp_path / name).mkdir()
    urls = {name: str(tmp_path / name) for name in codecs}
    block = CheckpointStore(regions=list(urls.values()), region_codecs={urls[n]: c for n, c in codecs.items()})
    layer = torch.nn.Linear(256, 256)  # its weight: 65536 fp32 = 256 KiB, one chunk
    block.save_checkpoint({"model": layer.state_dict()}, lineage="lin")
    got = load_state(_alone(tmp_path, "zs"), lineage="lin")[0]
    assert _same(got["model"]["weight"], layer.weight.detach())


# -- delta fine-tune chains through retention and GC on a mixed store -----------------------------------------


def _finetune(seed: int, steps: int) -> list[dict[str, Any]]:
    weights, weights32 = _weights(150_000, seed), _weights(40_000, seed + 1, torch.float32)
    frozen = torch.randint(0, 256, (70_000,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    states = []
    for step in range(1, steps + 1):
        weights, weights32 = _nudge(weights, step), _nudge(weights32, 100 + step)
        states.append({"model": {"w": weights, "w32": weights32, "frozen": frozen}, "step": step})
    return states


def test_a_delta_fine_tune_through_rounds_of_retention_and_gc_never_leaves_a_kept_version_unloadable(tmp_path):
    block = _block(tmp_path, THREE, quorum=3, delta=True, retention=RetentionPolicy(keep_last=3))
    states = _finetune(5, 14)
    for number, state in enumerate(states, 1):
        assert block.save_checkpoint(state, lineage="ft", step=number).version == number
        if number % 4 == 0 or number == len(states):
            _age_blobs(tmp_path)
            report = block.audit()
            assert report.healthy, report.markdown()
            kept = sorted(block.core.versions("ft"))
            assert kept == list(range(max(1, number - 2), number + 1))
            for name in THREE:
                for version in kept:
                    loaded = load_state(_alone(tmp_path, name), lineage="ft", version=version)[0]
                    _assert_equal(loaded, states[version - 1])
    chunks = _chunks(block.core, "ft")
    # The compressed regions really hold deltas; the raw region every chunk whole.
    assert any(select_form(c, "zstd").parent is not None for c in chunks)
    assert any(select_form(c, "auto").parent is not None for c in chunks)
    assert all(select_form(c, "none").parent is None and select_form(c, "none").codec is None for c in chunks)
    assert block.verify(decode=True).healthy

    # The auto region loses the first blob of one of its delta chains, which only a pruned
    # version named with another form (retention removed it, GC swept its raw form). Repair
    # rebuilds it from the zstd region's chain of the same content, in the auto region's codec.
    def root(chunk: ChunkRef) -> ChunkRef:
        return chunk if chunk.parent is None else root(chunk.parent)

    deepest = max(chunks, key=lambda c: select_form(c, "auto").chain_length())
    assert select_form(deepest, "auto").chain_length() > 3
    lost = root(select_form(deepest, "auto"))
    assert lost.digest not in {d for c in chunks for d, _ in select_form(c, "none").form_blobs()}
    assert lost.content_digest not in {c.content_digest for c in chunks}  # no kept version names it
    (tmp_path / "au" / blob_key(lost.digest)).unlink()
    healed = block.verify(repair=True)
    assert healed.problems and all(p.repaired for p in healed.problems), [p.detail for p in healed.problems]
    assert (tmp_path / "au" / blob_key(lost.digest)).is_file()
    assert block.verify(decode=True).healthy
    for version in sorted(block.core.versions("ft")):
        _assert_equal(block.load_checkpoint(lineage="ft", version=version), states[version - 1])
        for name in THREE:
            loaded = load_state(_alone(tmp_path, name), lineage="ft", version=version)[0]
            _assert_equal(loaded, states[version - 1])


# -- a region's codec changed between saves ---------------------------------------------------------------------


def test_codecs_rotated_between_delta_saves_keep_every_version_loadable_and_verify_says_what_to_do(tmp_path):
    states = _finetune(9, 6)
    before = _block(tmp_path, THREE, quorum=3, delta=True)
    for state in states[:3]:
        before.save_checkpoint(state, lineage="rot")
    rotated = {"raw": "auto", "zs": "none", "au": "zstd"}
    after = _block(tmp_path, rotated, quorum=3, delta=True)
    for state in states[3:]:
        after.save_checkpoint(state, lineage="rot")
    # The new saves follow the new codecs: the region now raw holds whole raw chunks.
    for chunk in _chunks(after.core, "rot", 6):
        form = select_form(chunk, "none")
        assert form.codec is None and form.parent is None
    # Every version loads from the store and from each region alone, before any repair.
    for name in THREE:
        for version, state in enumerate(states, 1):
            _assert_equal(load_state(_alone(tmp_path, name), lineage="rot", version=version)[0], state)
    # Verify under the new codecs reports exactly the blobs of older versions' new forms each region lacks.
    found = after.verify()
    assert not found.healthy and found.problems
    assert all(p.kind == "missing" and p.version in (1, 2, 3) for p in found.problems), found.problems
    expected = {
        (name, blob_key(d))
        for version in (1, 2, 3)
        for c in _chunks(after.core, "rot", version)
        if c.forms
        for name, codec in rotated.items()
        for d, _ in select_form(c, codec).form_blobs()
        if not (tmp_path / name / blob_key(d)).exists()
    }
    assert {(Path(p.region).name, p.object) for p in found.problems} == expected
    healed = after.verify(repair=True)
    assert all(p.repaired for p in healed.problems), [p.detail for p in healed.problems if not p.repaired]
    assert after.verify(decode=True).healthy
    # The old configuration's verify sees nothing missing either: older forms were never deleted.
    assert before.verify().healthy or all(p.version in (4, 5, 6) for p in before.verify().problems)
    for name in THREE:
        for version, state in enumerate(states, 1):
            _assert_equal(load_state(_alone(tmp_path, name), lineage="rot", version=version)[0], state)


# -- hand-written manifests whose forms lie ----------------------------------------------------------------------


def _craft(root: Path, lineage: str, source: int, target: int, mutate: Callable[[dict[str, Any]], None]) -> None:
    """Version ``target``: version ``source``'s manifest edited by ``mutate``, re-digested (unsigned),
    written into every region as a hostile writer with write access would."""
    raw = json.loads((root / "raw" / manifest_key(lineage, source)).read_bytes())
    raw["version"] = target
    mutate(raw)
    body = {key: value for key, value in raw.items() if key not in ("manifest_digest", "signature")}
    raw["manifest_digest"] = hash_bytes(canonical_json(body), raw["hash_algorithm"])
    raw["signature"] = None
    for region in THREE:
        (root / region / manifest_key(lineage, target)).write_bytes(canonical_json(raw))


def _multi(raw: dict[str, Any], skip: int = 0) -> dict[str, Any]:
    """A chunk of entry model/w with several forms."""
    entry = next(e for e in raw["entries"] if e["name"] == "model/w")
    return [c for c in entry["chunks"] if c.get("forms")][skip]


def _zstd_of(chunk: dict[str, Any]) -> dict[str, Any]:
    return next(f for f in chunk["forms"] if f.get("codec") == "zstd")


def _other_content(raw: dict[str, Any]) -> None:
    form = _zstd_of(_multi(raw))
    form["decoded_digest"] = _multi(raw, 1)["digest"]


def _blob_of_another_chunk_first(raw: dict[str, Any]) -> None:
    """The primary form becomes another chunk's zstd blob, claiming this chunk's content."""
    mine, other = _multi(raw), _multi(raw, 1)
    liar = {**_zstd_of(other), "decoded_digest": mine["digest"]}
    liar["size"] = mine["size"]
    honest = {k: v for k, v in mine.items() if k != "forms"}
    mine.clear()
    mine.update({**liar, "forms": [honest]})


def _blob_of_another_chunk_as_form(raw: dict[str, Any]) -> None:
    mine, other = _multi(raw), _multi(raw, 1)
    mine["forms"] = [{**_zstd_of(other), "decoded_digest": mine["digest"], "size": mine["size"]}]


def _other_lineages_blob(raw: dict[str, Any]) -> None:
    other = json.loads(Path(os.environ["_OTHER_MANIFEST"]).read_bytes())
    theirs = next(c for e in other["entries"] for c in e["chunks"] if c.get("forms") and c["size"] == CHUNK)
    mine = _multi(raw)
    mine["forms"] = [{**_zstd_of(theirs), "decoded_digest": mine["digest"]}]


def _huge_forms(raw: dict[str, Any]) -> None:
    mine = _multi(raw)
    form = _zstd_of(mine)
    mine["forms"] = [form] * 20_000


def _forms_in_a_form(raw: dict[str, Any]) -> None:
    mine = _multi(raw)
    _zstd_of(mine)["forms"] = [dict(_zstd_of(mine))]


def _primary_repeated(raw: dict[str, Any]) -> None:
    mine = _multi(raw)
    mine["forms"] = mine["forms"] + [{k: v for k, v in mine.items() if k != "forms"}]


LIES = {
    "form-with-other-content": _other_content,
    "primary-is-another-chunks-blob": _blob_of_another_chunk_first,
    "form-is-another-chunks-blob": _blob_of_another_chunk_as_form,
    "form-is-another-lineages-blob": _other_lineages_blob,
    "20k-forms": _huge_forms,
    "form-with-forms": _forms_in_a_form,
    "primary-repeated-as-form": _primary_repeated,
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_manifest_whose_forms_lie_never_yields_wrong_bytes(tmp_path, lie, monkeypatch):
    block = _block(tmp_path, THREE, quorum=3)
    honest = _state(3)
    block.save_checkpoint(honest, lineage="x")
    block.save_checkpoint(_state(4), lineage="other")
    monkeypatch.setenv("_OTHER_MANIFEST", str(tmp_path / "raw" / manifest_key("other", 1)))
    _craft(tmp_path, "x", 1, 2, LIES[lie])
    stores = [block.core] + [_alone(tmp_path, name) for name in THREE]
    for store in stores:
        try:
            got = load_state(store, lineage="x", version=2)[0]
        except CheckpointError:
            continue  # refused: a typed error
        _assert_equal(got, honest)  # or served, but only the honest bytes
        # Served from a region alone means that region really holds a true form of every chunk.
    # The latest is version 2 only if it loads; the honest version 1 always does, from every region.
    for store in stores:
        _assert_equal(load_state(store, lineage="x", version=1)[0], honest)
    # Verify blames the forged version only: the honest one stays "ok" in every region.
    report = block.verify(decode=True)
    assert all(p.version in (2, None) for p in report.problems), [
        (p.version, p.region, p.detail) for p in report.problems
    ]
    honest_row = next(row for row in report.checkpoints if (row.lineage, row.version) == ("x", 1))
    assert set(honest_row.regions.values()) == {"ok"}, honest_row.regions
    healed = block.verify(repair=True, decode=True)
    for name in THREE:
        _assert_equal(load_state(_alone(tmp_path, name), lineage="x", version=1)[0], honest)
    assert all(p.version in (2, None) for p in healed.problems)


# -- Prefect result storage on a mixed store ------------------------------------------------------------------


def test_prefect_results_on_a_mixed_store_round_trip_from_each_region_alone(prefect_server, tmp_path):
    from prefect import flow, task

    from prefect_recovery.blocks.result_storage import result_paths

    block = _block(tmp_path, THREE, quorum=3)
    name = f"mixed-results-{uuid.uuid4().hex[:10]}"
    block.save(name)
    storage = f"checkpoint-store/{name}"

    @task(persist_result=True, result_storage=storage)
    def weights(seed: int) -> torch.Tensor:
        return _weights(120_000, seed)

    @flow(persist_result=True, result_storage=storage)
    def pipeline(seed: int) -> dict[str, Any]:
        return {"w": weights(seed), "seed": seed}

    out = pipeline(7)
    assert _same(out["w"], _weights(120_000, 7))
    paths = result_paths(block)
    assert paths
    values = {path: block.read_path(path) for path in paths}
    for name in THREE:
        alone = CheckpointStore(regions=[str(tmp_path / name)])
        assert {path: alone.read_path(path) for path in paths} == values
    # The compressed regions hold the results compressed: fewer bytes than the raw one.
    assert _blob_bytes(tmp_path / "au") < _blob_bytes(tmp_path / "raw")
    assert block.verify(decode=True).healthy


def test_rewriting_a_rotten_result_on_a_mixed_store_heals_every_regions_copy(tmp_path):
    block = _block(tmp_path, {"raw": "none", "au": "auto"}, quorum=2)
    value = bytes(_bits(_weights(100_000, 3)))
    block.write_path("key", value)
    for blob in (tmp_path / "raw" / "blobs").rglob("*"):
        if blob.is_file():
            blob.write_bytes(b"\0" * blob.stat().st_size)
    for blob in (tmp_path / "au" / "blobs").rglob("*"):
        if blob.is_file():
            blob.write_bytes(b"\0" * blob.stat().st_size)
    with pytest.raises(CheckpointError):
        block.read_path("key")
    block.write_path("key", value)  # what Prefect does after a failed read: the same bytes again
    assert block.read_path("key") == value
    assert CheckpointStore(regions=[str(tmp_path / "au")]).read_path("key") == value


# -- DCP through the store's writer, and export after the raw region is gone ----------------------------------------


def test_dcp_saves_on_a_mixed_store_load_from_each_region_alone_and_export_without_the_raw_region(tmp_path):
    import torch.distributed.checkpoint as dcp

    from prefect_recovery.training.export import export_checkpoint

    block = _block(tmp_path, THREE, quorum=2)
    model = torch.nn.Sequential(torch.nn.Linear(96, 300), torch.nn.Linear(300, 40)).to(torch.bfloat16)
    state = {"model": model.state_dict(), "extra": {"ids": torch.arange(20_000)}}
    dcp.save(state, storage_writer=block.dcp_writer("dcp-run", step=5))
    chunks = _chunks(block.core, "dcp-run")
    assert any(c.forms for c in chunks)  # each region in its own codec
    for name in THREE:
        alone = CheckpointStore(regions=[str(tmp_path / name)])
        target = {
            "model": {k: torch.zeros_like(v) for k, v in model.state_dict().items()},
            "extra": {"ids": torch.zeros(20_000, dtype=torch.int64)},
        }
        dcp.load(target, storage_reader=alone.dcp_reader("dcp-run"), no_dist=True)
        _assert_equal(target, state)
    # The raw region deleted outright (a lost disk): the store exports from the compressed ones.
    shutil.rmtree(tmp_path / "raw")
    summary = export_checkpoint(block.core, lineage="dcp-run", version=None, to=tmp_path / "out")
    assert summary
    tensors = load_file(str(tmp_path / "out" / "tensors.safetensors"))
    want = [t for t in _flat(state).values() if isinstance(t, torch.Tensor)]
    assert sorted(_bits(t) for t in tensors.values()) == sorted(_bits(t) for t in want)
    # ... and so does the CLI, given the two remaining regions.
    flags = [arg for name in ("zs", "au") for arg in ("--region", str(tmp_path / name))]
    exported = _cli("export", *flags, "--lineage", "dcp-run", "--to", str(tmp_path / "cli-out"), "--json")
    assert exported.returncode == 0, exported.stdout + exported.stderr
    again = load_file(str(tmp_path / "cli-out" / "tensors.safetensors"))
    assert sorted(_bits(t) for t in again.values()) == sorted(_bits(t) for t in tensors.values())


# -- a region lost whole and re-created empty is rebuilt in its own codec -------------------------------------------


@pytest.mark.parametrize("lost", ["raw", "au"])
def test_a_region_lost_whole_is_rebuilt_by_repair_in_its_own_codec(tmp_path, lost):
    block = _block(tmp_path, THREE, quorum=2, delta=True)
    states = _finetune(11, 5)
    for state in states:
        block.save_checkpoint(state, lineage="lost")
    kept = _blob_names(tmp_path / lost)
    shutil.rmtree(tmp_path / lost)
    assert _cli("init", "--region", str(tmp_path / lost), "--json").returncode == 0
    # Meanwhile the store still loads every version (quorum 2 of the other two holds).
    for version, state in enumerate(states, 1):
        _assert_equal(block.load_checkpoint(lineage="lost", version=version), state)
    healed = block.verify(repair=True)
    assert healed.problems and all(p.repaired for p in healed.problems), [
        p.detail for p in healed.problems if not p.repaired
    ]
    assert block.verify(decode=True).healthy
    # The region holds again exactly what it held: its own codec's forms, byte for byte.
    assert _blob_names(tmp_path / lost) == kept
    for version, state in enumerate(states, 1):
        _assert_equal(load_state(_alone(tmp_path, lost), lineage="lost", version=version)[0], state)


# -- signing covers forms; bad settings are refused before anything is written -----------------------------------


def test_on_a_signing_mixed_store_a_manifest_with_edited_forms_is_refused(tmp_path):
    import secrets

    from prefect_recovery.core.errors import ManifestSignatureError
    from prefect_recovery.core.signing import Keyring, hmac_key

    keyring = Keyring(hmac_key("k1", secrets.token_hex(32)))
    for name in THREE:
        (tmp_path / name).mkdir()
    regions = [open_region(str(tmp_path / name)) for name in THREE]
    codecs = {region.name: THREE[Path(region.name).name] for region in regions}
    store = Store(regions, chunk_bytes=CHUNK, region_codecs=codecs, keyring=keyring)  # type: ignore[arg-type]
    honest = _state(6)
    save_state(store, honest, lineage="signed")
    # A writer without the key swaps the auto region's form for another chunk's, keeping the signature.
    raw = json.loads((tmp_path / "raw" / manifest_key("signed", 1)).read_bytes())
    signature = raw["signature"]
    raw["version"] = 2
    _blob_of_another_chunk_as_form(raw)
    body = {key: value for key, value in raw.items() if key not in ("manifest_digest", "signature")}
    raw["manifest_digest"] = hash_bytes(canonical_json(body), raw["hash_algorithm"])
    raw["signature"] = signature
    for name in THREE:
        (tmp_path / name / manifest_key("signed", 2)).write_bytes(canonical_json(raw))
    for name in THREE:
        alone = Store([open_region(str(tmp_path / name))], keyring=keyring)
        with pytest.raises(CheckpointError):
            load_state(alone, lineage="signed", version=2)
        with pytest.raises(ManifestSignatureError):  # nor is it skipped silently for "latest"
            load_state(alone, lineage="signed")
        _assert_equal(load_state(alone, lineage="signed", version=1)[0], honest)


def test_bad_region_codec_settings_are_typed_errors_before_anything_is_written(tmp_path):
    from pydantic import ValidationError

    from prefect_recovery.core.errors import InvalidArgumentError, RegionConfigError

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with pytest.raises(RegionConfigError, match="names no region"):
        CheckpointStore(regions=[str(a), str(b)], region_codecs={str(tmp_path / "c"): "zstd"})
    with pytest.raises(ValidationError, match="region_codecs"):
        CheckpointStore(regions=[str(a), str(b)], region_codecs={str(a): "lz4"})
    with pytest.raises(InvalidArgumentError, match="no region of this store"):
        Store([open_region(str(a))], region_codecs={"elsewhere": "zstd"})
    with pytest.raises(CheckpointError):
        Store([open_region(str(a))], region_codecs={str(a): "brotli"})  # type: ignore[dict-item]
    assert not any(a.iterdir()) and not any(b.iterdir())
