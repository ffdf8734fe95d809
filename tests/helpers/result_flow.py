"""A flow whose task result is persisted in a CheckpointStore and cached by its inputs.

test_result_storage.py runs it in its own process and again in new ones, so a cache hit has
to read the result back from the store. Each execution of the task appends a line to the file
named by $RESULT_FLOW_MARKER, so a test sees whether the task ran or its cached result was used.

    python tests/helpers/result_flow.py STORAGE X [X ...]   # STORAGE: 'checkpoint-store/<block name>'

prints ``{"results": [...]}``, one flow run per X.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import INPUTS


@task(cache_policy=INPUTS, persist_result=True)
def square(x: int) -> dict[str, int]:
    with Path(os.environ["RESULT_FLOW_MARKER"]).open("a") as marker:
        marker.write(f"square({x}) ran in pid {os.getpid()}\n")
    return {"x": x, "square": x * x}


def pipeline(storage: Any) -> Any:
    """The flow with ``storage`` (a block, or a block slug) as its result storage."""

    @flow(result_storage=storage, persist_result=True)
    def squares(x: int) -> int:
        return square(x)["square"]

    return squares


if __name__ == "__main__":
    storage, xs = sys.argv[1], [int(x) for x in sys.argv[2:]]
    print(json.dumps({"results": [pipeline(storage)(x) for x in xs]}))
