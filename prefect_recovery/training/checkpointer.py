"""``Checkpointer``: drop-in checkpointing for an ordinary training loop.

::

    with Checkpointer(store, "my-run", model=model, optimizer=opt, scheduler=sched,
                      data=loader, schedule=CheckpointSchedule.every(50), seed=0) as ckpt:
        while ckpt.step_count < total_steps:
            batch = next(batches)
            ...  # forward, backward, optimizer.step(), scheduler.step()
            ckpt.step()                       # saves when the schedule says so
        ckpt.milestone("train_end")

Entering restores the latest consistent checkpoint of the lineage (or seeds everything from
``seed`` on a first run). Inside a pipeline run, pass the run's resume point
(``resume_from=run.resume_point()``, handed to the training step as an argument): it names the
version a recovery selected and journals every commit. The restore reads each blob once and
checks it against its digest before anything is handed out; a blob with no intact copy stops it
with ``BlobUnavailableError`` and nothing restored. What a checkpoint holds (DESIGN.md
invariants 5 and 6):

| component    | durable | what                                                     |
|--------------|---------|----------------------------------------------------------|
| model        | yes     | ``state_dict()``: parameters and buffers                  |
| optimizer    | yes     | ``state_dict()``                                          |
| scheduler    | yes     | LR scheduler ``state_dict()``                             |
| scaler       | yes     | ``torch.amp.GradScaler.state_dict()``                      |
| data         | yes     | data-loader / sampler ``state_dict()`` (position)         |
| rng          | yes     | Python, NumPy, torch CPU and CUDA RNG states              |
| determinism  | yes     | seed, thread count, deterministic flags, default dtype    |
| counters     | yes     | step and epoch                                            |
| extras       | yes     | user objects (``state_dict()`` or plain values)           |
| gradients    | no      | never written; they are recomputed after a resume         |

A heavy save holds all of them, goes to every region and counts at the store's quorum; resume
uses heavy saves only. A light save holds ``schedule.light_components`` and goes to the first
region alone, under the sibling lineage ``<lineage>.light``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

from ..core import progress
from ..core.errors import CheckpointNotFoundError, InvalidArgumentError
from ..core.layout import LIGHT_SUFFIX, check_base_lineage
from ..core.manifest import Component
from ..core.models import CheckpointInfo
from ..core.store import core_store
from . import first_calls, rng_guard
from .async_saver import AsyncSaver
from .context import ResumePoint, active_hooks
from .determinism import (
    apply_settings,
    capture_rng,
    capture_settings,
    execution_fingerprint,
    extra_state,
    load_extra_state,
    mkl_cnr,
    restore_rng,
    seed_everything,
)
from .encoding import encode_state
from .loaders import adapt
from .schedule import CheckpointSchedule, Tier
from .staging import StagingBuffers
from .state_io import load_state
from .step_trace import StepTrace

logger = logging.getLogger("prefect_recovery.checkpointer")

PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class Preempted(SystemExit):
    """Raised from ``step()`` after the emergency checkpoint that a SIGTERM asked for."""

    def __init__(self, info: CheckpointInfo | None):
        super().__init__(PREEMPTED_EXIT_CODE)
        self.info = info


class UnseededInitWarning(UserWarning):
    """A first run's model was built before torch was seeded with the Checkpointer's seed."""


class NonReproducibleKernelsWarning(UserWarning):
    """This process's MKL computes without conditional numerical reproducibility (``reproducible_kernels``)."""


_kernels_reported = False  # once per process: every Checkpointer of it computes with the same MKL mode


def check_reproducible_kernels(strict: bool, report: bool = True) -> None:
    """MKL without CNR may round differently from run to run (``prefect_recovery.reproducible_kernels``): warn
    once per process; strict determinism refuses to train."""
    global _kernels_reported
    if mkl_cnr() != "off":
        return
    message = (
        "torch computes with Intel MKL's conditional numerical reproducibility off in this process (MKL_CBWR "
        "was unset when torch ran its first matrix product: before prefect_recovery was imported, or with "
        "PREFECT_RECOVERY_REPRODUCIBLE_KERNELS=0), and MKL may then round differently from run to run, so a "
        "repeated or resumed run may not be bit-identical. Import prefect_recovery before torch computes "
        "anything, or start the process with MKL_CBWR=AUTO (docs/DETERMINISM.md)."
    )
    if strict:
        raise rng_guard.DeterminismError(message)
    if report and not _kernels_reported:
        _kernels_reported = True
        logger.warning(message)
        warnings.warn(message, NonReproducibleKernelsWarning, stacklevel=4)


def _torch_initial_seed() -> int | None:
    import torch

    return torch.initial_seed()


def _chain(first: Callable[[Any], None] | None, second: Callable[[Any], None]) -> Callable[[Any], None]:
    if first is None:
        return second

    def both(info: Any) -> None:
        first(info)
        second(info)

    return both


def _implicit_resume_point(lineage: str) -> ResumePoint | None:
    """The deprecated path: the resume point an enclosing PipelineRun of ``lineage`` publishes in a
    context variable for Checkpointers built without ``resume_from``."""
    found = active_hooks(lineage)
    if found is not None:
        message = (
            f"Checkpointer({lineage!r}) inside a PipelineRun took the run's resume point from context; pass it "
            "instead: `run.resume_point()` in the flow, handed to the training step as an argument, then "
            "`Checkpointer(..., resume_from=resume)` (see docs/PIPELINES.md). The implicit form is removed in 0.4."
        )
        logger.warning(message)
        warnings.warn(message, DeprecationWarning, stacklevel=3)
    return found


def _distributed_world() -> int:
    """The world size of an initialised ``torch.distributed``, else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _watch_gradients(model: Any, callback: Callable[[Any], None]) -> list[Any]:
    """Hooks that tell the Checkpointer a backward() accumulated gradients into ``model``."""
    parameters = getattr(model, "parameters", None)
    if parameters is None:
        return []
    return [
        parameter.register_post_accumulate_grad_hook(callback)
        for parameter in parameters()
        if getattr(parameter, "requires_grad", False)
    ]


class Checkpointer:
    """Restores and saves the training state of one lineage on a declarative schedule.

    ``resume_from`` (a pipeline run's ``run.resume_point()``) says which version to restore (a
    recovery's choice; None: the latest) and journals each committed heavy checkpoint; an
    explicit ``resume_version`` wins over its version and ``on_commit`` is called as well.

    Inside torchrun (``torch.distributed`` initialised with more than one rank) the same call
    builds a ``DistributedCheckpointer``: every rank saves its part through DCP
    (docs/DISTRIBUTED.md). ``distributed=True`` asks for it in a one-rank job, ``False`` keeps
    this single-process one.
    """

    def __new__(cls, *args: Any, distributed: bool | None = None, **kwargs: Any) -> Checkpointer:
        if cls is Checkpointer and (distributed or (distributed is None and _distributed_world() > 1)):
            from ..distributed.checkpointer import DistributedCheckpointer  # torch.distributed, loaded on use

            return super().__new__(DistributedCheckpointer)
        return super().__new__(cls)

    def __init__(
        self,
        store: Any,
        lineage: str,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        data: Any = None,
        extras: dict[str, Any] | None = None,
        schedule: CheckpointSchedule | None = None,
        seed: int | None = None,
        owner: str = "trainer",
        metadata: dict[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        handle_sigterm: bool = True,
        on_commit: Callable[[CheckpointInfo], None] | None = None,
        resume_version: int | None = None,
        strict_determinism: bool | None = None,
        resume_from: ResumePoint | None = None,
        distributed: bool | None = None,  # read by __new__
    ):
        self.store = core_store(store)
        self.lineage = check_base_lineage(lineage)  # exp.light / exp.steps are derived lineages, never by hand
        if data is not None:
            data = adapt(data)  # refuses a plain DataLoader with the fix; see training/loaders.py
        self.objects = {
            name: value
            for name, value in (
                ("model", model),
                ("optimizer", optimizer),
                ("scheduler", scheduler),
                ("scaler", scaler),
                ("data", data),
            )
            if value is not None
        }
        self.extras = dict(extras or {})
        self.schedule = schedule or CheckpointSchedule()
        self.seed = seed
        self.owner = owner
        self.metadata = dict(metadata or {})
        self.clock = clock
        self.handle_sigterm = handle_sigterm
        # Where a pipeline run's training starts (a recovery's version) and who journals each
        # commit: passed as a value (`resume_from=run.resume_point()`); `resume_version` and
        # `on_commit` given here still win / are called too.
        if resume_from is None:
            resume_from = _implicit_resume_point(lineage)
        elif resume_from.lineage != self.lineage:
            raise InvalidArgumentError(
                f"Checkpointer({lineage!r}) was given the resume point of lineage {resume_from.lineage!r}; "
                "pass the resume point of the pipeline run that trains this lineage"
            )
        if resume_from is not None and resume_version is None:
            resume_version = resume_from.version
        if resume_from is not None and resume_from.on_commit is not None and resume_from.on_commit != on_commit:
            on_commit = _chain(on_commit, resume_from.on_commit)
        self.resume_version = resume_version  # what `with Checkpointer(...)` restores (None: latest)
        self.on_commit = on_commit  # called with every committed heavy checkpoint (writer thread for async)
        # On a first run, a model built before torch was seeded with `seed` starts from weights a
        # re-run cannot repeat (warned about in restore()).
        self._unseeded_init = model is not None and seed is not None and _torch_initial_seed() != seed
        self._last_heavy_step: int | None = None
        self._deferred_milestone: str | None = None
        self._grads_pending = False  # backward() ran since the last step(): gradients a save would lose
        self._grad_hooks = _watch_gradients(model, self._on_gradient)
        self.step_count = 0
        self.epoch = 0
        self.resumed_from: dict[str, int | None] | None = None
        self._settings: dict[str, Any] | None = None
        self._last_save = {"light": clock(), "heavy": clock()}
        self._saver = AsyncSaver(self.schedule.max_in_flight, self.schedule.on_backpressure)
        self._staging = StagingBuffers(self.schedule.max_in_flight)
        self._light_store = self.store.derive(self.store.regions[:1], write_quorum=1, placement="primary")
        self._preempted = threading.Event()
        self._previous_handler: Any = None
        # PREFECT_RECOVERY_STEP_TRACE=DIR: a digest of the weights and gradients at every step (step_trace.py)
        self._trace = StepTrace.from_environment(
            self.lineage,
            model,
            data,
            {"lineage": self.lineage, "seed": seed, "store": [region.name for region in self.store.regions]},
        )
        # The global RNGs belong to the thread that enters (training/rng_guard.py); strict mode
        # also checks that the Checkpointer's own work (saves, hooks, events) leaves them alone.
        if strict_determinism is None:
            strict_determinism = os.environ.get("PREFECT_RECOVERY_STRICT_DETERMINISM", "").lower() in ("1", "true")
        self.strict_determinism = strict_determinism
        check_reproducible_kernels(strict_determinism, report=self._reports_warnings)
        first_calls.settle()  # before the first step: MKL's racing first parallel call rounds differently
        self.rng_interference: list[rng_guard.Interference] = []  # foreign draws, served privately
        self._claimed = False
        self._watchdog: threading.Timer | None = None

    def _on_gradient(self, _parameter: Any) -> None:
        self._grads_pending = True

    # -- restore ---------------------------------------------------------------------------
    # Whether this process reports run-wide warnings (every rank of a distributed job would repeat them).
    _reports_warnings = True

    def _first_run(self) -> None:
        """No checkpoint to resume: seed (when given) and record the settings of a fresh start."""
        if self._unseeded_init and self._reports_warnings:
            message = (
                f"Checkpointer({self.lineage!r}, seed={self.seed}): the model was built before torch was seeded "
                f"with {self.seed}, so its initial weights differ from run to run and a run killed before its "
                "first checkpoint cannot restart bit-identically. Call "
                f"`prefect_recovery.seed_everything({self.seed})` before building the model."
            )
            logger.warning(message)
            warnings.warn(message, UnseededInitWarning, stacklevel=4)
        if self.seed is not None:
            seed_everything(self.seed)
        self._settings = capture_settings(self.seed)
        self.resumed_from = None
        return None

    def restore(self, version: int | None = None) -> dict[str, int | None] | None:
        """Load the latest consistent checkpoint (or ``version``) into the live objects.

        Returns ``{"version", "step"}`` of what was restored, or None when the lineage has no
        checkpoint yet; then everything is seeded from ``seed`` for a fresh, repeatable start.
        """
        try:
            state, manifest = load_state(self.store, lineage=self.lineage, version=version)
        except CheckpointNotFoundError:
            if version is not None:
                raise
            return self._first_run()
        for name, target in self.objects.items():
            if name not in state:
                raise CheckpointNotFoundError(
                    f"checkpoint {self.lineage} v{manifest.version} has no {name!r} component to restore"
                )
            target.load_state_dict(state[name])
        for name, target in self.extras.items():
            value = state.get("extras", {}).get(name)
            if not load_extra_state(target, value):  # state_dict() objects and private generators: in place
                self.extras[name] = value
        apply_settings(state["determinism"])
        self._settings = state["determinism"]
        restore_rng(state["rng"])
        self.step_count = int(state["counters"]["step"])
        self.epoch = int(state["counters"]["epoch"])
        self.resumed_from = {"version": manifest.version, "step": manifest.step}
        now = self.clock()
        self._last_save = {"light": now, "heavy": now}
        logger.info("restored %s v%s at step %s", self.lineage, manifest.version, manifest.step)
        return self.resumed_from

    # -- capture -----------------------------------------------------------------------------
    def capture(self, tier: Tier = "heavy") -> dict[str, Any]:
        """The state to save (live references; ``encode_state(copy=True)`` snapshots it)."""
        state: dict[str, Any] = {name: obj.state_dict() for name, obj in self.objects.items()}
        if self.extras:
            state["extras"] = {name: extra_state(obj) for name, obj in self.extras.items()}
        state["rng"] = capture_rng()
        state["determinism"] = self._settings or capture_settings(self.seed)
        state["counters"] = {"step": self.step_count, "epoch": self.epoch}
        if tier == "light":
            state = {name: value for name, value in state.items() if name in self.schedule.light_components}
        return state

    def _components(self, state: dict[str, Any]) -> list[Component]:
        components = [Component(name=name, durable=True, owner=self.owner) for name in state]
        components.append(Component(name="gradients", durable=False, owner=self.owner))
        return components

    # -- saving ------------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        """Count ``n`` completed steps and save if the schedule says so.

        Call it after ``optimizer.step()`` (with gradient accumulation: after the optimizer step
        that applies the accumulated gradients), where the state is whole.
        """
        # Other threads' Python/NumPy draws were served privately (kept for diagnosis); a torch seeding
        # call from another thread is reported (strict mode: DeterminismError naming this step).
        rng_guard.collect(self, f"during step {self.step_count + n}")
        self._saver.raise_errors()
        previous = self.step_count
        self.step_count += n
        progress.advance("step", self.step_count, 0)  # open-ended: whoever knows the last step shows a bar
        self._grads_pending = False
        if self._trace is not None:
            self._trace.record(self.step_count)
        if self._preempted.is_set():
            self._emergency_exit()
        decision = self.schedule.decide(self.step_count, seconds_since=self._seconds_since(), previous_step=previous)
        deferred, self._deferred_milestone = self._deferred_milestone, None
        if deferred is not None:  # a milestone reported mid-accumulation saves at this boundary
            wanted = self.schedule.decide(self.step_count, seconds_since=self._seconds_since(), milestone=deferred)
            if wanted is not None and (decision is None or wanted[0] == "heavy" or decision[0] == "light"):
                self._save(wanted[0], wanted[1], wait=True)
                return
        if decision is not None:
            self._save(*decision)

    def milestone(self, name: str, *, wait: bool = True) -> CheckpointInfo | None:
        """Report a named event (``epoch_end``, ``eval_best``, ``final``...); saves if scheduled.

        Milestone saves are synchronous by default (``wait``): the call returns once committed.
        Reported in the middle of gradient accumulation (``backward()`` ran since the last
        ``step()``), the save is deferred to the next ``step()``: a checkpoint never holds a
        state whose accumulated gradients it would lose (gradients are not saved).
        """
        self._saver.raise_errors()
        decision = self.schedule.decide(self.step_count, seconds_since=self._seconds_since(), milestone=name)
        if decision is None:
            return None
        if self._grads_pending:
            logger.info(
                "milestone %s at step %s came in the middle of gradient accumulation: saving at the next step()",
                name,
                self.step_count,
            )
            self._deferred_milestone = name
            return None
        return self._save(decision[0], decision[1], wait=wait)

    def end_epoch(self, *, wait: bool = True) -> CheckpointInfo | None:
        """Count a finished epoch (``epoch`` + 1) and report the ``epoch_end`` milestone.

        The usual loop::

            for epoch in range(ckpt.epoch, epochs):   # a resumed run starts in its epoch
                for batch in loader:                  # a restored loader continues mid-epoch
                    ...; ckpt.step()
                ckpt.end_epoch()

        No second heavy save is written when one was already taken at this step (a timebox or
        every-N save on the epoch's last batch): resuming from it ends the epoch the same way.
        """
        self.epoch += 1
        if self._last_heavy_step == self.step_count and not self._grads_pending:
            logger.info("epoch %s ended at step %s, already saved at this step", self.epoch - 1, self.step_count)
            return None
        return self.milestone("epoch_end", wait=wait)

    def save(self, tier: Tier = "heavy", *, trigger: str = "manual", wait: bool = True) -> CheckpointInfo | None:
        """Save now, whatever the schedule says."""
        self._saver.raise_errors()
        return self._save(tier, trigger, wait=wait)

    def _seconds_since(self) -> dict[str, float]:
        now = self.clock()
        return {tier: now - at for tier, at in self._last_save.items()}

    def _save(self, tier: Tier, trigger: str, wait: bool = False) -> CheckpointInfo | None:
        # A save (and, when synchronous, its commit hooks and events) must not move the training's
        # RNGs: compared before and after, put back, or DeterminismError in strict mode (rng_guard).
        with rng_guard.OwnWork(self, f"{tier} save ({trigger})"):
            return self._save_now(tier, trigger, wait)

    def _save_now(self, tier: Tier, trigger: str, wait: bool) -> CheckpointInfo | None:
        store = self.store if tier == "heavy" else self._light_store
        lineage = self.lineage if tier == "heavy" else self.lineage + LIGHT_SUFFIX
        metadata = {
            **self.metadata,
            "tier": tier,
            "trigger": trigger,
            "epoch": self.epoch,
            "complete": tier == "heavy",
            "execution": execution_fingerprint(),  # how this process computes: named when two runs diverge
        }
        step = self.step_count
        asynchronous = self.schedule.asynchronous and not wait
        if asynchronous and not self._saver.acquire():
            logger.warning("skipped %s save at step %s: %s saves in flight", tier, step, self._saver.max_in_flight)
            return None
        if not asynchronous:
            self._saver.flush()  # keep versions in step order
        slot = self._staging.take() if asynchronous else None
        try:
            state = self.capture(tier)
            # The only stall of an async save: copying the state into this slot's host buffers.
            snapshot = self._staging.copier(slot) if slot is not None else None
            encoded = encode_state(state, snapshot=snapshot)
            components = self._components(state)
        except BaseException:
            if slot is not None:
                self._staging.give_back(slot)
                self._saver.release()
            raise

        def commit() -> CheckpointInfo:
            try:
                info = store.commit(
                    lineage, encoded.entries, step=step, tree=encoded.tree, components=components, metadata=metadata
                )
            finally:
                if slot is not None:
                    self._staging.give_back(slot)
            if tier == "heavy" and self.on_commit is not None:
                # On the writer thread (async saves) a hook's torch draws would move the training's generator:
                # served privately there (rng_guard.confine_torch); on the training thread OwnWork brackets it.
                with rng_guard.confine_torch():
                    self.on_commit(info)
            return info

        now = self.clock()
        self._last_save["light"] = now
        if tier == "heavy":
            self._last_save["heavy"] = now
            self._last_heavy_step = step
        if asynchronous:
            self._saver.submit(f"{tier} {trigger} at step {step}", commit)
            return None
        return commit()

    # -- preemption --------------------------------------------------------------------------
    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # Only flag it: the state is consistent at the next step() boundary, not mid-update.
        self._preempted.set()
        deadline = self.schedule.emergency_deadline_seconds
        self._watchdog = threading.Timer(deadline, self._deadline_passed)
        self._watchdog.daemon = True
        self._watchdog.start()

    def _deadline_passed(self) -> None:
        logger.error("emergency checkpoint missed its %ss deadline; exiting", self.schedule.emergency_deadline_seconds)
        os._exit(PREEMPTED_EXIT_CODE)

    def _emergency_exit(self) -> None:
        logger.warning("SIGTERM: writing an emergency checkpoint at step %s", self.step_count)
        info = None
        try:
            info = self._save("heavy", "emergency", wait=True)
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
        raise Preempted(info)

    @property
    def preempted(self) -> bool:
        return self._preempted.is_set()

    # -- lifecycle ---------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> bool:
        return self._saver.flush(timeout)

    def close(self) -> None:
        """Wait for pending saves (raising the first failure) and stop the writer."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        try:
            self._saver.close()
        finally:
            if self._claimed:
                self._claimed = False
                self.rng_interference += rng_guard.take_interference()
                rng_guard.release()
            if self._previous_handler is not None:
                signal.signal(signal.SIGTERM, self._previous_handler)
                self._previous_handler = None

    def __enter__(self) -> Checkpointer:
        rng_guard.claim()
        self._claimed = True
        try:
            self.restore(self.resume_version)
        except BaseException:
            # `with` calls __exit__ only after __enter__ returned: a failed restore must release
            # the RNG guard and stop the writer itself, or other threads stay on private generators.
            self.close()
            raise
        if self.handle_sigterm and threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        elif self.handle_sigterm:
            logger.info("not in the main thread: SIGTERM emergency checkpoints are off")
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()
