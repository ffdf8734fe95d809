"""The math libraries' first calls, made once per process on one thread before training computes.

Issue 18's divergence (docs/DETERMINISM.md, "The cause"): Intel MKL's vector math library (VML), which
ATen's CPU kernels call for ``sqrt``, ``exp``, ``log``, ``erf``, ``tanh``, ``sin``... of contiguous float
tensors, sets itself up at its first call in a process. In a training that first call is usually AdamW's
``exp_avg_sq.sqrt()`` in step 1, and ATen runs it on both OpenMP threads at once; on MKL's Intel code
paths the two racing first callers sometimes compute with different implementations, so the first
parameter's update differs by rounding (about 1e-6 in the weights later), once per process, more often
under load. Measured here with MKL on its Intel paths (the stand-in of ``tests/test_first_call_race.py``):
the first parallel ``sqrt`` of a fresh process differed in 11 of 80 processes, and after one tiny call on
one thread in none of 60; the example's first step under a Checkpointer, 7 of 80 without this, 0 of 80 with.

``settle()`` makes those first calls on tensors small enough that ATen runs them on the calling thread.
It is idempotent and cheap (16 ms once, then nothing); the ``Checkpointer``, ``seed_everything`` and every
``@step`` call it, so a training loop that builds either before its first step, and a pipeline's data
steps, are covered.
"""

from __future__ import annotations

import functools

import torch

# The unary functions ATen hands to MKL's VML (aten/src/ATen/cpu/vml.h); one call sets VML up, the rest
# make each function's own dispatch settle too, in case a build sets them up one by one.
_VML_FUNCTIONS = ("sqrt", "rsqrt", "exp", "expm1", "log", "log1p", "log10", "erf", "erfc", "erfinv", "tanh",
                  "sin", "cos", "tan", "asin", "acos", "atan", "trunc", "lgamma")  # fmt: skip


@functools.cache
def settle() -> None:
    """Make each lazily initialised math function's first call here, on this thread (once per process)."""
    for dtype in (torch.float32, torch.float64):
        small = torch.full((8,), 0.5, dtype=dtype)  # far below ATen's parallel grain: one thread
        for name in _VML_FUNCTIONS:
            getattr(torch, name)(small)
