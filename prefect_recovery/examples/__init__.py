"""The example pipeline shipped with prefect-recovery, in one place; read it as a template.

* ``workload.py``: the training itself, pure torch: seeded synthetic data (or a safetensors
  file), a small MLP, and a loop checkpointed by ``Checkpointer``;
* ``steps.py``: its idempotent ``@step`` tasks (``prepare-data``, ``train``, ``evaluate``,
  ``finalize``);
* ``pipeline.py``: the ``example-pipeline`` flow, registered for ``recover`` (and, with its
  replay hook, ``replay-check``) through the ``example`` entry point of the
  ``prefect_recovery.pipelines`` group.

Nothing in the library imports this package: ``prefect-recovery demo``, ``crash-test`` and
``serve`` load it when they run the example, and ``recover`` finds the flow through the
pipeline registry like any user's pipeline.
"""

# Digested as pipeline code, like a user's modules (tasks/code.py), not as the library.
__pipeline_code__ = True
