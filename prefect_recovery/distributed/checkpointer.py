"""The ``Checkpointer`` inside ``torchrun``: every rank calls ``step()``; saves go through DCP.

``Checkpointer(...)`` returns this class by itself when ``torch.distributed`` is initialised
with more than one rank, so a training script needs no change (docs/DISTRIBUTED.md)::

    dist.init_process_group("gloo")                       # torchrun set RANK, WORLD_SIZE...
    model = DDP(Net())                                    # or fully_shard(Net()) (FSDP2)
    with Checkpointer(store, "exp", model=model, optimizer=opt, data=loader, seed=0) as ckpt:
        while ckpt.step_count < steps:
            ...; ckpt.step()

What each save holds (``rank_state.py`` has the key layout):

* **global, once**: model and optimizer through ``get_state_dict`` (DCP writes a replicated DDP
  tensor once and each FSDP2 shard by the rank that holds it), scheduler, scaler, extras and the
  step and epoch counters, the last four taken from rank 0;
* **per rank**: the torch, NumPy and Python RNG states, the data-loader position and the
  determinism settings (thread count: torchrun sets ``OMP_NUM_THREADS=1`` per rank).

Every rank must make the same save at the same step: the ranks agree once per ``step()`` (one
small all-reduce on a CPU group of the Checkpointer's own) on what rank 0's schedule decided
(``Timebox`` reads rank 0's clock) and on whether any rank got SIGTERM. At most one DCP save is
in flight (``dcp.async_save`` on a second CPU group, so its collectives never interleave with
the training's): a save due while one is writing waits for it.

A resume at the same world size restores every rank bit-identically. At another world size DCP
reshards the model and optimizer; a ``DistributedResumableSampler`` continues the epoch at its
global cursor; ranks that existed keep their RNG; new ranks seed theirs from the run's seed and
their rank (``derived_seed``), with a ``RankStateWarning``; any other data object refuses
(``WorldSizeChangeError``) because its position cannot be re-split.
"""

from __future__ import annotations

import logging
import warnings
from concurrent.futures import Future
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..core.errors import CheckpointError, CheckpointNotFoundError
from ..core.layout import LIGHT_SUFFIX
from ..core.models import CheckpointInfo
from ..training import rng_guard
from ..training.checkpointer import Checkpointer
from ..training.determinism import (
    apply_settings,
    capture_rng,
    capture_settings,
    extra_state,
    is_generator,
    load_extra_state,
    restore_rng,
    seed_everything,
)
from ..training.schedule import Tier
from .context import rank_context
from .dcp import dcp_reader, dcp_tree, dcp_writer
from .rank_state import (
    GLOBAL,
    TREE,
    derived_seed,
    join_state,
    rank_prefix,
    source_rank,
    split_state,
    tensor_keys,
    tree_of,
    tree_tensor,
)
from .sampler import find_sampler

logger = logging.getLogger("prefect_recovery.checkpointer")

LAYOUT = "prefect-recovery/distributed/1"
GLOBAL_COMPONENTS = ("model", "optimizer", "scheduler", "scaler", "extras", "counters")
RANK_COMPONENTS = ("rng", "data", "determinism", "buffers", "generators")
_LABELS = ("every_n_steps", "timebox", "milestones")


class WorldSizeChangeError(CheckpointError):
    """A checkpoint cannot be restored at this world size as asked (see docs/DISTRIBUTED.md)."""


class RankStateWarning(UserWarning):
    """A rank's own state (RNG) was not in the checkpoint and was derived instead."""


def distributed_world() -> int:
    """The world size when ``torch.distributed`` is initialised, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class DistributedCheckpointer(Checkpointer):
    """``Checkpointer`` for one rank of a ``torch.distributed`` job (see the module docstring).

    Takes the ``Checkpointer``'s arguments, plus ``collective_timeout`` (seconds, default 600):
    how long a rank waits in a checkpoint's collectives for a rank that died or hangs before it
    raises instead of hanging.
    """

    def __init__(self, store: Any, lineage: str, *, collective_timeout: float = 600.0, **kwargs: Any):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DistributedCheckpointer needs torch.distributed initialised (dist.init_process_group) first"
            )
        context = rank_context()
        if kwargs.get("resume_from") is None and context.lineage == lineage:
            # The launcher's hand-over (run_ranks: the environment), when the script passed none.
            kwargs["resume_from"] = context.resume_point(store)
        self.rank = dist.get_rank()  # before the base's __init__, which asks _reports_warnings
        self.world_size = dist.get_world_size()
        super().__init__(store, lineage, **kwargs)
        if "optimizer" in self.objects and "model" not in self.objects:
            raise ValueError("a distributed Checkpointer saves the optimizer with its model: pass model= too")
        timeout = timedelta(seconds=collective_timeout)
        # Two CPU groups of its own: saves (possibly on a background thread) and the per-step
        # agreement (training thread) must never interleave with each other or the training's.
        self._save_group = dist.new_group(backend="gloo", timeout=timeout)
        self._control_group = dist.new_group(backend="gloo", timeout=timeout)
        self._pending: tuple[Future[Any], Any, Tier, int] | None = None
        self.saved_world_size: int | None = None

    # -- the store's DCP backend (prefect_recovery/distributed/dcp.py) ------------------------
    def _writer(self, tier: Tier, step: int, metadata: dict[str, Any]) -> Any:
        store = self.store if tier == "heavy" else self._light_store
        lineage = self.lineage if tier == "heavy" else self.lineage + LIGHT_SUFFIX
        return dcp_writer(store, lineage, step=step, metadata=metadata)

    def _reader(self, version: int) -> Any:
        return dcp_reader(self.store, self.lineage, version)

    # -- what ranks agree on -----------------------------------------------------------------
    def _broadcast(self, value: Any) -> Any:
        box = [value if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self._control_group)
        return box[0]

    def _choose(self, version: int | None) -> tuple[int | None, int | None, str | None]:
        """Rank 0 resolves the version to restore; every rank gets (version, saved world, error)."""
        answer: tuple[int | None, int | None, str | None] = (None, None, None)
        if self.rank == 0:
            try:
                manifest, _holders = self.store.resolve(self.lineage, version)
                layout = manifest.metadata.get("distributed")
                if (not isinstance(layout, dict) or "world_size" not in layout) and manifest.tree == dcp_tree():
                    answer = (None, None, (
                        f"checkpoint {self.lineage} v{manifest.version} was saved by dcp.save through dcp_writer, not "
                        "by a Checkpointer: it holds whatever state dict was passed, not a Checkpointer's layout; "
                        "load it with dcp.load(state_dict, storage_reader=dcp_reader(store, lineage)), or give the "
                        "Checkpointer a lineage of its own"
                    ))  # fmt: skip
                elif not isinstance(layout, dict) or "world_size" not in layout:
                    answer = (None, None, (
                        f"checkpoint {self.lineage} v{manifest.version} was written by a single process, not by "
                        f"torch.distributed ranks; restore it without torchrun (or start a new lineage)"
                    ))  # fmt: skip
                else:
                    answer = (manifest.version, int(layout["world_size"]), None)
            except CheckpointNotFoundError as exc:
                if version is not None:
                    answer = (None, None, str(exc))
        return self._broadcast(answer)

    # -- restore -----------------------------------------------------------------------------
    def restore(self, version: int | None = None) -> dict[str, int | None] | None:
        """Every rank restores the latest consistent distributed checkpoint (or ``version``)."""
        self.flush()
        chosen, saved_world, error = self._choose(version)
        if error is not None:
            cls = CheckpointNotFoundError if chosen is None and version is not None else WorldSizeChangeError
            raise cls(error)
        if chosen is None:
            return self._first_run()
        assert saved_world is not None
        source = source_rank(self.rank, saved_world)
        global_tree_key, rank_tree_key = f"{GLOBAL}/{TREE}", f"{rank_prefix(source)}/{TREE}"
        stored = self._reader(chosen).read_metadata().state_dict_metadata
        trees = {key: torch.empty(stored[key].size, dtype=torch.uint8) for key in (global_tree_key, rank_tree_key)}
        dcp.load(trees, storage_reader=self._reader(chosen), process_group=self._save_group)
        global_tree, rank_tree = tree_of(trees[global_tree_key]), tree_of(trees[rank_tree_key])
        live = self._live_tensors()
        template: dict[str, torch.Tensor] = {}
        for key in tensor_keys(global_tree) + tensor_keys(rank_tree):
            meta = stored[key]
            target = live.get(key)
            if target is not None and list(target.shape) == list(meta.size) and target.dtype == meta.properties.dtype:
                template[key] = target  # read straight into the live (possibly sharded) tensor
            else:
                template[key] = torch.empty(meta.size, dtype=meta.properties.dtype)
        dcp.load(template, storage_reader=self._reader(chosen), process_group=self._save_group)
        global_state = join_state(global_tree, template)
        rank_state = join_state(rank_tree, template)
        self._restore_global(global_state)
        self._restore_rank(rank_state, saved_world)
        self.saved_world_size = saved_world
        counters = global_state["counters"]
        self.step_count, self.epoch = int(counters["step"]), int(counters["epoch"])
        self.resumed_from = {"version": chosen, "step": self.step_count}
        now = self.clock()
        self._last_save = {"light": now, "heavy": now}
        logger.info(
            "rank %s/%s restored %s v%s at step %s (written by %s ranks)",
            self.rank,
            self.world_size,
            self.lineage,
            chosen,
            self.step_count,
            saved_world,
        )
        return self.resumed_from

    @property
    def _reports_warnings(self) -> bool:  # type: ignore[override]
        return self.rank == 0

    def _live_tensors(self) -> dict[str, torch.Tensor]:
        """The model's and optimizer's tensors under their DCP keys, sharded as they live now."""
        model_state, optim_state = self._model_optimizer_state()
        state = {key: value for key, value in (("model", model_state), ("optimizer", optim_state)) if value is not None}
        return split_state(state, GLOBAL)[1]

    def _model_optimizer_state(self) -> tuple[Any, Any]:
        model = self.objects.get("model")
        if model is None:
            return None, None
        optimizer = self.objects.get("optimizer")
        model_state, optim_state = get_state_dict(
            model, optimizers=[optimizer] if optimizer is not None else [], options=StateDictOptions()
        )
        return model_state, optim_state if optimizer is not None else None

    def _restore_global(self, state: dict[str, Any]) -> None:
        model = self.objects.get("model")
        if model is not None:
            if "model" not in state:
                raise CheckpointNotFoundError(f"checkpoint of {self.lineage} has no 'model' component to restore")
            optimizer = self.objects.get("optimizer")
            if optimizer is not None and "optimizer" not in state:
                raise CheckpointNotFoundError(f"checkpoint of {self.lineage} has no 'optimizer' component to restore")
            set_state_dict(
                model,
                optimizers=[optimizer] if optimizer is not None else [],
                model_state_dict=state["model"],
                optim_state_dict=state.get("optimizer", {}) if optimizer is not None else {},
            )
        for name in ("scheduler", "scaler"):
            if name in self.objects:
                if name not in state:
                    raise CheckpointNotFoundError(f"checkpoint of {self.lineage} has no {name!r} component to restore")
                self.objects[name].load_state_dict(state[name])
        for name, target in self.extras.items():
            if is_generator(target):
                continue  # per rank: _restore_rank
            value = state.get("extras", {}).get(name)
            if not load_extra_state(target, value):
                self.extras[name] = value

    def _restore_rank(self, state: dict[str, Any], saved_world: int) -> None:
        resized = saved_world != self.world_size
        data = self.objects.get("data")
        if data is not None:
            if resized and find_sampler(data) is None:
                raise WorldSizeChangeError(
                    f"checkpoint of {self.lineage} was written by {saved_world} ranks and this job has "
                    f"{self.world_size}: the data position of a {type(getattr(data, 'loader', data)).__name__} is "
                    "per rank and cannot be re-split. Use prefect_recovery.distributed.DistributedResumableSampler "
                    f"(its position is global), or resume with {saved_world} ranks."
                )
            data.load_state_dict(state["data"])
        if isinstance(state.get("buffers"), dict):  # absent from checkpoints written before it was kept
            self._restore_buffers(state["buffers"])
        apply_settings(state["determinism"])
        self._settings = state["determinism"]
        if self.rank < saved_world:
            restore_rng(state["rng"])
            for name, value in dict(state.get("generators") or {}).items():
                if name in self.extras and is_generator(self.extras[name]):
                    load_extra_state(self.extras[name], value)
        else:
            seed = derived_seed(self.seed, self.rank)
            message = (
                f"rank {self.rank} did not exist when {self.lineage} was saved by {saved_world} ranks: its RNG is "
                f"seeded from the run's seed {self.seed} and its rank (derived_seed = {seed}), and its private "
                "generators (extras) stay as the script seeded them, so this resume is repeatable but not "
                "bit-identical to a run that always had this many ranks"
            )
            logger.warning(message)
            warnings.warn(message, RankStateWarning, stacklevel=4)
            seed_everything(seed)
        if resized and self.rank == 0 and saved_world > self.world_size:
            logger.warning(
                "%s was saved by %s ranks, resumed by %s: the RNG states of ranks %s..%s are not used",
                self.lineage,
                saved_world,
                self.world_size,
                self.world_size,
                saved_world - 1,
            )

    def _rank_buffers(self) -> dict[str, torch.Tensor]:
        """This rank's own copy of the model's persistent buffers that are not DTensors.

        FSDP2 (unlike DDP, which broadcasts them from rank 0 every forward) leaves buffers such as
        BatchNorm's running statistics local: each rank updates its own from its own batches. In
        the global model state DCP keeps one of them (its dedup takes a plain tensor of the same
        key as replicated), so a resume gave every rank the same statistics and was not
        bit-identical. Kept per rank as well, each rank gets its own back (identical copies, as
        DDP's, cost one blob: blobs are content-addressed).
        """
        model = self.objects.get("model")
        if model is None:
            return {}
        found: dict[str, torch.Tensor] = {}
        for module_name, module in model.named_modules():
            skip = getattr(module, "_non_persistent_buffers_set", set())
            for name, buffer in module.named_buffers(recurse=False):
                if buffer is None or name in skip or hasattr(buffer, "device_mesh"):
                    continue
                found[f"{module_name}.{name}" if module_name else name] = buffer.detach()
        return found

    def _restore_buffers(self, saved: dict[str, Any]) -> None:
        """Copy the restored rank's buffers back into the live model (those of the same name and shape)."""
        live = self._rank_buffers()
        with torch.no_grad():
            for name, value in saved.items():
                target = live.get(name)
                if isinstance(value, torch.Tensor) and target is not None and target.shape == value.shape:
                    target.copy_(value)

    # -- capture -----------------------------------------------------------------------------
    def capture_parts(self, tier: Tier = "heavy") -> tuple[dict[str, Any], dict[str, Any]]:
        """(global state, this rank's state) for a save of ``tier`` (live references)."""
        wanted = set(self.schedule.light_components) if tier == "light" else None
        model_state, optim_state = self._model_optimizer_state()
        global_state: dict[str, Any] = {}
        if model_state is not None:
            global_state["model"] = model_state
        if optim_state is not None:
            global_state["optimizer"] = optim_state
        for name in ("scheduler", "scaler"):
            if name in self.objects:
                global_state[name] = self.objects[name].state_dict()
        shared = {name: obj for name, obj in self.extras.items() if not is_generator(obj)}
        if shared:
            global_state["extras"] = {name: extra_state(obj) for name, obj in shared.items()}
        global_state["counters"] = {"step": self.step_count, "epoch": self.epoch}
        rank_state: dict[str, Any] = {"rng": capture_rng()}
        if "data" in self.objects:
            rank_state["data"] = self.objects["data"].state_dict()
        rank_state["determinism"] = self._settings or capture_settings(self.seed)
        buffers = self._rank_buffers()
        if buffers:
            rank_state["buffers"] = buffers
        generators = {name: extra_state(obj) for name, obj in self.extras.items() if is_generator(obj)}
        if generators:
            rank_state["generators"] = generators
        if wanted is not None:
            global_state = {key: value for key, value in global_state.items() if key in wanted or key == "counters"}
            rank_state = {
                key: value
                for key, value in rank_state.items()
                if key in wanted
                or key == "determinism"
                or (key == "buffers" and "model" in wanted)
                or (key == "generators" and "extras" in wanted)
            }
        return global_state, rank_state

    def capture(self, tier: Tier = "heavy") -> dict[str, Any]:
        global_state, rank_state = self.capture_parts(tier)
        return {**global_state, **rank_state}

    def _dcp_state(self, tier: Tier) -> dict[str, torch.Tensor]:
        global_state, rank_state = self.capture_parts(tier)
        global_tree, global_tensors = split_state(global_state, GLOBAL)
        prefix = rank_prefix(self.rank)
        rank_tree, rank_tensors = split_state(rank_state, prefix)
        state = {**global_tensors, **rank_tensors, f"{prefix}/{TREE}": tree_tensor(rank_tree)}
        if self.rank == 0:  # the global structure is rank 0's (DISTRIBUTED.md: "what is global")
            state[f"{GLOBAL}/{TREE}"] = tree_tensor(global_tree)
        return state

    # -- saving ------------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        """Count ``n`` completed steps on every rank and save together when rank 0's schedule says so."""
        self.rng_interference += rng_guard.take_interference()
        self._reap(wait=False)
        previous = self.step_count
        self.step_count += n
        self._grads_pending = False
        decision = None
        if self.rank == 0:
            decision = self.schedule.decide(
                self.step_count, seconds_since=self._seconds_since(), previous_step=previous
            )
        code = 0 if decision is None else (2 if decision[0] == "heavy" else 1) * 8 + _LABELS.index(decision[1])
        agreed = torch.tensor([int(self._preempted.is_set()), code], dtype=torch.int64)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=self._control_group)
        if int(agreed[0]):
            self._preempted.set()  # another rank got SIGTERM: every rank saves at this same step
            self._emergency_exit()
        code = int(agreed[1])
        decision = None if code == 0 else ("heavy" if code // 8 == 2 else "light", _LABELS[code % 8])
        deferred, self._deferred_milestone = self._deferred_milestone, None
        if deferred is not None:
            wanted = self.schedule.decide(self.step_count, seconds_since=self._seconds_since(), milestone=deferred)
            if wanted is not None and (decision is None or wanted[0] == "heavy" or decision[0] == "light"):
                self._save(wanted[0], wanted[1], wait=True)
                return
        if decision is not None:
            self._save(*decision)

    def _save_now(self, tier: Tier, trigger: str, wait: bool) -> CheckpointInfo | None:
        metadata = {
            **self.metadata,
            "tier": tier,
            "trigger": trigger,
            "epoch": self.epoch,
            "complete": tier == "heavy",
            "distributed": {"layout": LAYOUT, "world_size": self.world_size},
        }
        step = self.step_count
        self._reap(wait=True)  # one DCP save at a time: versions in step order, collectives in one order
        state = self._dcp_state(tier)
        writer = self._writer(tier, step, metadata)
        now = self.clock()
        self._last_save["light"] = now
        if tier == "heavy":
            self._last_save["heavy"] = now
            self._last_heavy_step = step
        if self.schedule.asynchronous and not wait:
            # async_save copies the state to CPU buffers before it returns; the training goes on.
            response = dcp.async_save(state, storage_writer=writer, process_group=self._save_group)
            self._pending = (getattr(response, "upload_completion", response), writer, tier, step)
            return None
        dcp.save(state, storage_writer=writer, process_group=self._save_group)
        return self._committed(writer, tier, step)

    def _committed(self, writer: Any, tier: Tier, step: int) -> CheckpointInfo | None:
        info = writer.info  # the committed version, on the coordinator (rank 0) only
        if info is not None and tier == "heavy" and self.rank == 0 and self.on_commit is not None:
            with rng_guard.OwnWork(self, f"commit hooks of the save at step {step}"):
                self.on_commit(info)
        return info

    def _reap(self, *, wait: bool) -> None:
        """Finish the save in flight when it is done (or ``wait``): raise its error, run its hooks."""
        if self._pending is None:
            return
        future, writer, tier, step = self._pending
        if not wait and not future.done():
            return
        self._pending = None
        try:
            future.result()
        except Exception as exc:
            from ..training.async_saver import SaveFailedError

            raise SaveFailedError(
                f"the {tier} save of {self.lineage} at step {step} failed on rank {self.rank}: {exc}; "
                "the previous committed version is still latest"
            ) from exc
        self._committed(writer, tier, step)

    # -- lifecycle ---------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        self._reap(wait=True)
        return True

    def close(self) -> None:
        try:
            self._reap(wait=True)
        finally:
            super().close()


__all__ = ["DistributedCheckpointer", "RankStateWarning", "WorldSizeChangeError", "distributed_world"]
