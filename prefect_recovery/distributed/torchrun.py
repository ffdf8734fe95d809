"""``python -m prefect_recovery.distributed.torchrun EXIT_CODES_JSON [torchrun arguments...]``.

torchrun itself (``torch.distributed.run.main``, the same argument parser and elastic agent),
plus one thing it only prints: every rank's exit code. When ranks fail, torchrun raises
``ChildFailedError`` whose ``failures`` map each failed rank to its exit code (negative: killed
by that signal); they are written to ``EXIT_CODES_JSON`` as ``{"rank": code}`` for every rank
of the job (0 for ranks that did not fail) before torchrun's own report and exit status.
``run_ranks`` (launch.py) reads that file to raise ``RanksFailedError``.
"""

from __future__ import annotations

import json
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser
from torch.distributed.run import main as torchrun_main


def _world_size(argv: list[str]) -> int:
    args = get_args_parser().parse_args(argv)
    nproc = args.nproc_per_node
    per_node = int(nproc) if str(nproc).isdigit() else 1
    nnodes = str(args.nnodes).split(":")[-1]
    return per_node * (int(nnodes) if nnodes.isdigit() else 1)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_codes_path, torchrun_argv = argv[0], argv[1:]
    world = _world_size(torchrun_argv)
    codes = {str(rank): 0 for rank in range(world)}
    try:
        torchrun_main(torchrun_argv)
    except ChildFailedError as exc:
        for rank, failure in exc.failures.items():
            codes[str(rank)] = int(failure.exitcode)
        _write(exit_codes_path, codes)
        raise
    _write(exit_codes_path, codes)


def _write(path: str, codes: dict[str, int]) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w") as handle:
        json.dump(codes, handle)
    os.replace(temporary, path)


if __name__ == "__main__":
    main()
