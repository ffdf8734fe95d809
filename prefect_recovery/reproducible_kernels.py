"""Ask the math libraries for run-to-run reproducible kernels before anything computes.

Bit-identical resumes need every run of the same state to round the same way. PyTorch's CPU build
does its matrix products with Intel MKL, and MKL's default is *not* run-to-run reproducible: Intel
documents that bitwise-identical results from run to run need conditional numerical reproducibility
(CNR, ``MKL_CBWR``) on, a fixed thread count, and ``MKL_DYNAMIC=FALSE``. (Issue 18's rare 1e-6
divergences turned out to have another cause, MKL's vector math racing at its first call:
``training/first_calls.py``. CNR did not stop that; it is kept as the condition Intel documents.)

MKL reads ``MKL_CBWR`` once, at its first computation, and refuses to change mode afterwards. So
this runs when ``prefect_recovery`` is imported (before torch's first matrix product in any program
that imports the package first) and only sets what the user has not: an ``MKL_CBWR`` or
``MKL_DYNAMIC`` already in the environment is kept. Child processes (torchrun ranks, workers'
flow runs, ``recover``) inherit the same settings. ``PREFECT_RECOVERY_REPRODUCIBLE_KERNELS=0``
leaves both alone. Whether CNR is really on in a process is checked where training starts
(``training.determinism.mkl_cnr``, recorded in every checkpoint's execution fingerprint).

Plain ``os`` only: importing ``prefect_recovery.core`` stays free of torch.
"""

from __future__ import annotations

import os

OPT_OUT = "PREFECT_RECOVERY_REPRODUCIBLE_KERNELS"

# AUTO: MKL picks the fastest code path for this CPU and keeps it run to run (measured here: the
# same GFLOP/s as the default for the example's shapes and for 4096x4096 products).
DEFAULTS = {"MKL_CBWR": "AUTO", "MKL_DYNAMIC": "FALSE"}


def request() -> dict[str, str]:
    """Set the defaults the environment lacks; returns what it set."""
    if os.environ.get(OPT_OUT, "").strip().lower() in ("0", "false", "no", "off"):
        return {}
    applied = {}
    for name, value in DEFAULTS.items():
        if name not in os.environ:
            os.environ[name] = value
            applied[name] = value
    return applied
