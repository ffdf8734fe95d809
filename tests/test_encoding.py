"""Torch state <-> store: every dtype bit-exact, structure kept, partial loads, no pickle.

Everything goes through the public API (``CheckpointStore.save``/``load``) on two local regions.
Tensors are compared through their uint8 views, so NaN payloads and odd bit patterns count.
"""

from __future__ import annotations

import ast
import copy
import enum
import math
import pickle
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import prefect_recovery
from prefect_recovery import BlobUnavailableError, CheckpointError, CheckpointStore
from prefect_recovery.core.layout import blob_key
from prefect_recovery.core.region_marker import MARKER_KEY
from prefect_recovery.training.encoding import DTYPES, UnsupportedValueError, encode_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # complex32 / quantized creation warnings


# -- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore.default(tmp_path / "store")


def region_dirs(store: CheckpointStore) -> list[Path]:
    return [Path(region.url) for region in store.regions]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A contiguous tensor of ``dtype`` whose bytes are random (NaNs, subnormals, odd bools...)."""
    tensor = torch.empty(shape, dtype=dtype)
    raw = tensor.reshape(-1).view(torch.uint8)
    if raw.numel():
        gen = torch.Generator().manual_seed(seed)
        raw.copy_(torch.randint(0, 256, (raw.numel(),), dtype=torch.uint8, generator=gen))
    return tensor


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bits in logical order (an integer view keeps odd bool bytes and sub-byte dtypes)."""
    as_int = tensor.view(_SAME_SIZE_INT[tensor.element_size()]) if tensor.element_size() in _SAME_SIZE_INT else tensor
    return as_int.contiguous().reshape(-1).view(torch.uint8)


def assert_same_tensor(restored: Any, original: torch.Tensor) -> None:
    assert type(restored) is torch.Tensor
    assert restored.dtype == original.dtype
    assert restored.shape == original.shape
    assert restored.is_contiguous()
    assert torch.equal(raw_bytes(restored), raw_bytes(original)), "tensor bytes differ"


def float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def assert_identical(restored: Any, original: Any, path: str = "root") -> None:
    """Same types (list vs tuple, bool vs int), same key order, bit-identical floats and tensors."""
    if isinstance(original, torch.Tensor):
        assert_same_tensor(restored, original.detach())
        return
    expected_type = bytes if isinstance(original, (bytearray, memoryview)) else type(original)
    if isinstance(original, enum.IntEnum):
        expected_type = int
    if isinstance(original, float):
        expected_type = float  # numpy.float64 is a float subclass: it comes back as a float
    if isinstance(original, dict):
        expected_type = dict  # an OrderedDict (state_dict()) comes back as a plain dict, same order
    assert type(restored) is expected_type, f"{path}: {type(restored).__name__} != {expected_type.__name__}"
    if isinstance(original, dict):
        assert list(restored) == list(original), f"{path}: keys or key order differ"
        assert [type(k) for k in restored] == [type(k) for k in original], f"{path}: key types differ"
        for key in original:
            assert_identical(restored[key], original[key], f"{path}/{key!r}")
    elif isinstance(original, (list, tuple)):
        assert len(restored) == len(original), f"{path}: length differs"
        for index, (got, want) in enumerate(zip(restored, original, strict=True)):
            assert_identical(got, want, f"{path}/{index}")
    elif isinstance(original, float):
        assert float_bits(restored) == float_bits(original), f"{path}: {restored!r} != {original!r} bitwise"
    else:
        assert restored == original, f"{path}: {restored!r} != {original!r}"


def round_trip(store: CheckpointStore, state: Any, lineage: str = "t") -> Any:
    store.save(state, lineage=lineage)
    return store.load(lineage=lineage)


# -- dtypes ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_every_dtype_round_trips_bit_exact(store: CheckpointStore, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    state = {
        "matrix": random_tensor((3, 5), dtype, seed=1),
        "cube": random_tensor((2, 3, 4), dtype, seed=2),
        "empty": torch.empty((0, 4), dtype=dtype),
        "empty_middle": torch.empty((3, 0, 2), dtype=dtype),
        "scalar": random_tensor((), dtype, seed=3),
        "offset_view": random_tensor((6, 4), dtype, seed=4)[2:],  # contiguous, nonzero storage offset
    }
    restored = round_trip(store, state)
    assert list(restored) == list(state)
    for key, original in state.items():
        assert_same_tensor(restored[key], original)
    assert restored["scalar"].dim() == 0


def test_well_known_dtypes_are_in_dtypes() -> None:
    for dtype in (torch.bfloat16, torch.bool, torch.complex64, torch.complex128, torch.float16, torch.uint8):
        assert dtype in DTYPES.values()


@pytest.mark.parametrize("dtype_name", sorted(DTYPES), ids=str)
def test_non_contiguous_inputs_restore_equal_and_contiguous(store: CheckpointStore, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    base = random_tensor((6, 5), dtype, seed=7)
    state = {
        "transposed": base.t(),
        "row_step": base[::2],
        "col_step": base[:, 1::2],
        "both_steps": base[1::3, ::2],
        "expanded": random_tensor((5,), dtype, seed=8).expand(4, 5),  # stride 0
    }
    for value in state.values():
        assert not value.is_contiguous()
    restored = round_trip(store, state)
    for key, original in state.items():
        assert_same_tensor(restored[key], original)


def test_lazy_conj_and_neg_views_store_their_values(store: CheckpointStore) -> None:
    complex_tensor = torch.randn(4, dtype=torch.complex64)
    real = torch.randn(4)
    state = {"conj": complex_tensor.conj(), "neg": torch._neg_view(real), "conj128": complex_tensor.double().conj()}
    assert state["conj"].is_conj() and state["neg"].is_neg()
    restored = round_trip(store, state)
    assert torch.equal(restored["conj"], complex_tensor.conj().resolve_conj())
    assert torch.equal(restored["neg"], -real)
    assert torch.equal(restored["conj128"], complex_tensor.double().conj().resolve_conj())
    assert not restored["conj"].is_conj() and not restored["neg"].is_neg()


def test_special_float_values_bit_exact_in_tensors(store: CheckpointStore) -> None:
    bits = [0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001]
    tensor = torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)
    restored = round_trip(store, {"x": tensor, "bf": tensor.view(torch.bfloat16)})
    assert_same_tensor(restored["x"], tensor)
    assert_same_tensor(restored["bf"], tensor.view(torch.bfloat16))


def test_tensors_with_requires_grad_come_back_as_plain_tensors(store: CheckpointStore) -> None:
    leaf = torch.randn(3, 4, requires_grad=True)
    parameter = torch.nn.Parameter(torch.randn(2))
    non_leaf = leaf * 2
    restored = round_trip(store, {"leaf": leaf, "param": parameter, "non_leaf": non_leaf})
    for key, original in (("leaf", leaf), ("param", parameter), ("non_leaf", non_leaf)):
        value = restored[key]
        assert type(value) is torch.Tensor
        assert not value.requires_grad
        assert value.grad_fn is None
        assert torch.equal(value, original.detach())


def test_restored_tensors_do_not_alias_each_other_or_the_input(store: CheckpointStore) -> None:
    shared = torch.arange(6, dtype=torch.float32)
    restored = round_trip(store, {"a": shared, "b": shared, "view": shared[1:4]})
    restored["a"].add_(100)
    assert torch.equal(restored["b"], torch.arange(6, dtype=torch.float32))
    assert torch.equal(restored["view"], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(shared, torch.arange(6, dtype=torch.float32))


def test_tensor_at_the_root(store: CheckpointStore) -> None:
    tensor = random_tensor((4, 4), torch.float64)
    assert_same_tensor(round_trip(store, tensor), tensor)


# -- structure --------------------------------------------------------------------------------------
class Color(enum.IntEnum):
    RED = 1


def test_nested_structure_fidelity(store: CheckpointStore) -> None:
    state = {
        "z_first": 1,
        0: "int key zero",
        "0": "str key zero",
        "#0": "str key that looks like an encoded int",
        -7: {3: [1, 2], 1: (3, 4)},
        "a": [1, (2, [3, (4,)]), [], (), {}],
        "none": None,
        "flags": [True, False, 1, 0],
        "ints": [0, -1, 2**63 - 1, 2**64, 2**64 + 1, 2**100, -(2**100), Color.RED],
        "floats": [0.0, -0.0, 1.5, 0.1, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308],
        "np_float": np.float64(2.5),  # a float subclass: stored as a float
        "strings": ["", "héllo ✓", "a/b", "..", ".", "%2E", "nul\x00inside", "x" * 10_000],
        "bytes": [b"", b"\x00\xff" * 1000, bytearray(b"mutable"), memoryview(b"view")],
        "odd keys": {"": 1, "a/b": 2, "..": 3, ".": 4, "%00": 5, "with space": 6, "ü": 7},
        "tensor": torch.arange(5),
    }
    restored = round_trip(store, state)
    assert_identical(restored, state)
    assert type(restored["np_float"]) is float


def test_optimizer_style_int_keys_survive(store: CheckpointStore) -> None:
    state = {
        "state": {0: {"step": torch.tensor(3.0)}, 1: {"step": torch.tensor(4.0)}},
        "param_groups": [{"params": [0, 1]}],
    }
    restored = round_trip(store, state)
    assert list(restored["state"]) == [0, 1]
    assert_identical(restored, state)


def test_positive_nan_float_is_kept(store: CheckpointStore) -> None:
    restored = round_trip(store, {"nan": math.nan})
    assert float_bits(restored["nan"]) == float_bits(math.nan)


def test_negative_and_payload_nan_floats_are_bit_exact(store: CheckpointStore) -> None:
    negative_nan = -math.nan
    payload_nan = struct.unpack("<d", (0x7FF8000000000001).to_bytes(8, "little"))[0]
    restored = round_trip(store, {"neg": negative_nan, "payload": payload_nan})
    assert float_bits(restored["neg"]) == float_bits(negative_nan)
    assert float_bits(restored["payload"]) == float_bits(payload_nan)


def test_empty_and_nul_string_keys_do_not_collide(store: CheckpointStore) -> None:
    state = {"": torch.tensor([1]), "\x00": torch.tensor([2])}
    assert_identical(round_trip(store, state), state)


def test_deep_but_allowed_nesting_round_trips(store: CheckpointStore) -> None:
    state: Any = torch.ones(1)
    for _ in range(50):
        state = {"n": [state]}
    restored = round_trip(store, state)
    for _ in range(50):
        restored = restored["n"][0]
    assert torch.equal(restored, torch.ones(1))


def test_nesting_below_max_tree_depth_saves_or_is_rejected_up_front(store: CheckpointStore) -> None:
    state: Any = torch.ones(1)
    for _ in range(150):
        state = {"n": state}
    try:
        store.save(state, lineage="deep")
    except UnsupportedValueError:
        return
    restored = store.load(lineage="deep")
    for _ in range(150):
        restored = restored["n"]
    assert torch.equal(restored, torch.ones(1))


# -- a real training state ------------------------------------------------------------------------------
def _make_training(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Dropout(0.2), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=20)
    return model, optimizer, scheduler


def _train(model, optimizer, scheduler, inputs, targets, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(inputs), targets)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_model_optimizer_scheduler_round_trip_and_training_continues_identically(store: CheckpointStore) -> None:
    gen = torch.Generator().manual_seed(123)
    inputs, targets = torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    model, optimizer, scheduler = _make_training(seed=0)
    _train(model, optimizer, scheduler, inputs, targets, steps=4)
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "step": 4,
    }
    store.save(state, lineage="train", step=4, metadata={"note": "after 4 steps"})
    saved = copy.deepcopy(state)  # training below mutates the optimizer's tensors in place
    reference_losses = _train(model, optimizer, scheduler, inputs, targets, steps=5)
    reference_params = {k: v.clone() for k, v in model.state_dict().items()}

    restored = store.load(lineage="train")
    assert_identical(restored, saved)
    assert restored["step"] == 4

    model2, optimizer2, scheduler2 = _make_training(seed=999)  # different init: everything must come from the store
    model2.load_state_dict(restored["model"])
    optimizer2.load_state_dict(restored["optimizer"])
    scheduler2.load_state_dict(restored["scheduler"])
    torch.set_rng_state(restored["rng"]["torch"])
    resumed_losses = _train(model2, optimizer2, scheduler2, inputs, targets, steps=5)

    assert resumed_losses == reference_losses
    for key, value in model2.state_dict().items():
        assert_same_tensor(value, reference_params[key])
    assert scheduler2.get_last_lr() == scheduler.get_last_lr()


# -- partial loads ------------------------------------------------------------------------------------------
def _partial_state() -> dict[str, Any]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    return {
        "model": model.state_dict(),
        "model_ema": {k: v * 0.5 for k, v in model.state_dict().items()},  # shares the "model" prefix
        "optimizer": optimizer.state_dict(),
        "step": 1,
    }


def _corrupt_blobs_of(store: CheckpointStore, lineage: str, prefix: str) -> int:
    """Flip a byte in every region's copy of the blobs only entries under ``prefix`` use."""
    manifest, _holders = store.core.resolve(lineage)
    ours = {c.digest for e in manifest.entries if e.name.startswith(prefix + "/") for c in e.chunks}
    others = {c.digest for e in manifest.entries if not e.name.startswith(prefix + "/") for c in e.chunks}
    targets = ours - others
    assert targets
    for digest in targets:
        for root in region_dirs(store):
            path = root / blob_key(digest)
            data = bytearray(path.read_bytes())
            data[0] ^= 0xFF
            path.write_bytes(bytes(data))
    return len(targets)


def test_partial_load_returns_only_the_selected_subtree(store: CheckpointStore) -> None:
    state = _partial_state()
    store.save(state, lineage="p")
    restored = store.load(lineage="p", keys=["model"])
    assert list(restored) == ["model"]
    assert_identical(restored["model"], state["model"])

    one = store.load(lineage="p", keys=["model/0.weight"])
    assert list(one) == ["model"]
    assert list(one["model"]) == ["0.weight"]
    assert_same_tensor(one["model"]["0.weight"], state["model"]["0.weight"])

    both = store.load(lineage="p", keys=["model/2.bias", "optimizer"])
    assert list(both) == ["model", "optimizer"]
    assert list(both["model"]) == ["2.bias"]
    assert_identical(both["optimizer"], state["optimizer"])


def test_partial_load_does_not_read_other_blobs(store: CheckpointStore) -> None:
    state = _partial_state()
    store.save(state, lineage="p")
    _corrupt_blobs_of(store, "p", "optimizer")  # every copy of the optimizer's bytes is now bad

    with pytest.raises(BlobUnavailableError):
        store.load(lineage="p")  # a full load reads them, and refuses them
    restored = store.load(lineage="p", keys=["model"])
    assert_identical(restored["model"], state["model"])
    one = store.load(lineage="p", keys=["model/0.weight"])
    assert_same_tensor(one["model"]["0.weight"], state["model"]["0.weight"])


def test_partial_load_of_unknown_key_is_a_clear_error(store: CheckpointStore) -> None:
    store.save(_partial_state(), lineage="p")
    with pytest.raises(CheckpointError, match="nope"):
        store.load(lineage="p", keys=["nope"])


def test_partial_load_of_a_subtree_without_tensors(store: CheckpointStore) -> None:
    random.seed(5)
    state = {"model": {"w": torch.ones(2)}, "rng": {"python": random.getstate()}, "step": 7}
    store.save(state, lineage="p")
    assert store.load(lineage="p", keys=["step"]) == {"step": 7}
    assert_identical(store.load(lineage="p", keys=["rng"]), {"rng": state["rng"]})


def test_partial_load_under_an_int_key(store: CheckpointStore) -> None:
    state = _partial_state()
    store.save(state, lineage="p")
    restored = store.load(lineage="p", keys=["optimizer/state/0"])
    assert_identical(restored["optimizer"]["state"][0], state["optimizer"]["state"][0])


# -- unsupported values -------------------------------------------------------------------------------------
def _quantized() -> torch.Tensor:
    return torch.quantize_per_tensor(torch.rand(3), 0.1, 0, torch.quint8)


def _cycle() -> list[Any]:
    loop: list[Any] = [1]
    loop.append({"again": loop})
    return loop


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (object, "object"),
        (lambda: {1, 2}, "set"),
        (lambda: frozenset({1}), "frozenset"),
        (lambda: np.zeros(3), "ndarray"),
        (lambda: np.int64(3), "int64"),
        (lambda: 1 + 2j, "complex"),
        (lambda: Path("/tmp"), "Path"),
        (lambda: torch.nn.Linear(2, 2), "Linear"),
        (_quantized, "quantized"),
        (lambda: torch.zeros(3).to_sparse(), "sparse"),
        (lambda: {(1, 2): 1}, "tuple"),
        (lambda: {True: 1}, "bool"),
        (lambda: {1.5: 1}, "float"),
        (lambda: {None: 1}, "NoneType"),
        (_cycle, "cycle"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unsupported_values_raise_with_their_path(store: CheckpointStore, make, kind: str) -> None:
    state = {"model": {"w": torch.ones(2)}, "extra": {"inner": make()}}
    with pytest.raises(UnsupportedValueError) as excinfo:
        store.save(state, lineage="bad")
    message = str(excinfo.value)
    assert "extra/inner" in message
    assert kind in message
    assert isinstance(excinfo.value, TypeError)
    # nothing was committed, and nothing was written (but the marker the store's creation left)
    assert store.list() == []
    for root in region_dirs(store):
        assert not [p for p in root.rglob("*") if p.is_file() and p.name != MARKER_KEY]


def test_too_deep_nesting_is_unsupported(store: CheckpointStore) -> None:
    state: Any = 1
    for _ in range(400):
        state = [state]
    with pytest.raises(UnsupportedValueError, match="deeper"):
        store.save(state, lineage="deep")


def test_shared_subtrees_are_not_mistaken_for_cycles(store: CheckpointStore) -> None:
    shared = {"lr": 0.1, "w": torch.ones(2)}
    state = {"a": shared, "b": shared, "c": [shared, shared]}
    assert_identical(round_trip(store, state), state)


def test_str_with_lone_surrogate_round_trips_or_is_rejected_with_its_path(store: CheckpointStore) -> None:
    state = {"data": {"files": ["ok.jpg", "caf\udce9.jpg"]}}
    try:
        store.save(state, lineage="s")
    except UnsupportedValueError as exc:
        assert "data/files" in str(exc)
        return
    assert_identical(store.load(lineage="s"), state)


# -- no pickle on the load path ------------------------------------------------------------------------------
def test_load_never_unpickles(store: CheckpointStore, monkeypatch: pytest.MonkeyPatch) -> None:
    state = _partial_state()
    state["blob"] = b"\x80\x04K\x01."  # bytes that happen to be a pickle stay bytes
    store.save(state, lineage="np")

    def forbidden(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the load path unpickled something")

    class ForbiddenUnpickler:
        def __init__(self, *_args: Any, **_kwargs: Any) -> None:
            forbidden()

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    monkeypatch.setattr(np, "load", forbidden)

    fresh = CheckpointStore(regions=[region.url for region in store.regions])
    restored = fresh.load(lineage="np")
    assert_identical(restored, state)
    assert restored["blob"] == b"\x80\x04K\x01."


PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def test_storage_layers_do_not_import_pickle_or_call_torch_load() -> None:
    package = Path(prefect_recovery.__file__).parent
    offenders = []
    for folder in ("core", "training", "blocks"):
        for source in sorted((package / folder).rglob("*.py")):
            tree = ast.parse(source.read_text(), filename=str(source))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name.split(".")[0] for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [(node.module or "").split(".")[0]]
                elif isinstance(node, ast.Attribute) and node.attr == "load":
                    base = node.value
                    names = [base.id + ".load"] if isinstance(base, ast.Name) else []
                    names = [n for n in names if n in ("torch.load", "np.load", "numpy.load")]
                else:
                    continue
                for name in names:
                    if name in PICKLE_MODULES or name.endswith(".load"):
                        offenders.append(f"{source.relative_to(package)}:{node.lineno}: {name}")
    assert offenders == []


def test_encode_state_plans_raw_little_endian_bytes_with_dtype_and_shape() -> None:
    tensor = torch.tensor([[1, 2], [3, 258]], dtype=torch.int16)
    encoded = encode_state({"w": tensor, "b": b"xyz", "n": 3})
    by_name = {entry.name: entry for entry in encoded.entries}
    assert set(by_name) == {"w", "b"}
    assert by_name["w"].dtype == "int16" and by_name["w"].shape == [2, 2]
    assert bytes(by_name["w"].data) == np.array([1, 2, 3, 258], dtype="<i2").tobytes()
    assert bytes(by_name["b"].data) == b"xyz"
    assert encoded.tree == {"dict": [["w", {"tensor": "w"}], ["b", {"bytes": "b"}], ["n", 3]]}


# -- loading into existing tensors -------------------------------------------------------------------------------
def test_load_into_fills_matching_live_tensors_in_place(store: CheckpointStore) -> None:
    torch.manual_seed(0)
    saved = torch.nn.Linear(6, 3)
    store.save({"model": saved.state_dict(), "step": 4}, lineage="into")

    live = torch.nn.Linear(6, 3)  # a fresh model: its parameters get the saved values in place
    target = {"model": live.state_dict()}
    weight_storage = live.weight.data_ptr()
    restored = store.load(lineage="into", into=target)

    assert restored["step"] == 4
    assert restored["model"]["weight"] is target["model"]["weight"]
    assert live.weight.data_ptr() == weight_storage
    assert torch.equal(live.weight, saved.weight) and torch.equal(live.bias, saved.bias)


def test_load_into_allocates_where_the_live_tensor_does_not_fit(store: CheckpointStore) -> None:
    store.save({"a": torch.arange(6.0), "b": torch.ones(2, 3), "c": torch.zeros(4)}, lineage="misfit")
    live = {"a": torch.zeros(6, dtype=torch.float64), "b": torch.zeros(3, 2), "c": torch.zeros(8)[::2]}
    restored = store.load(lineage="misfit", into=live)
    for key in ("a", "b", "c"):  # wrong dtype, wrong shape, non-contiguous: never written into
        assert restored[key] is not live[key]
        assert not live[key].any()
    assert torch.equal(restored["a"], torch.arange(6.0))
    assert torch.equal(restored["b"], torch.ones(2, 3))


def test_load_into_with_keys_reads_only_the_selected_subtree(store: CheckpointStore) -> None:
    store.save({"model": {"w": torch.ones(3)}, "optimizer": {"m": torch.full((3,), 2.0)}}, lineage="both")
    live = {"model": {"w": torch.zeros(3)}, "optimizer": {"m": torch.zeros(3)}}
    restored = store.load(lineage="both", keys=["model"], into=live)
    assert set(restored) == {"model"}
    assert torch.equal(live["model"]["w"], torch.ones(3))
    assert not live["optimizer"]["m"].any()
