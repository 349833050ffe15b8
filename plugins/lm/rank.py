"""A non-zero rank of a distributed ``train`` job, started by rank 0 (the job's worker).

It rebuilds the job's context from ``LLMOS_RANK_SPEC``, trains in lockstep with rank 0 through
torch.distributed, and reports nothing itself: rank 0 speaks for the job.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import traceback
from pathlib import Path

from llmos.context import JobContext
from llmos.plugins.lm import TrainParams
from llmos.plugins.lm.train import TrainRunner


def main() -> int:
    spec = json.loads(os.environ["LLMOS_RANK_SPEC"])
    ctx = JobContext(
        job_id=spec["job_id"],
        kind=spec["kind"],
        params=TrainParams(**spec["params"]),
        attempt=spec["attempt"],
        resources=spec["resources"],
        placement=spec["placement"],
        workdir=Path(spec["workdir"]),
        emit=lambda suffix, type_name, body: None,
        cancel_event=threading.Event(),
        rank=int(os.environ["RANK"]),
    )
    runner = TrainRunner()
    try:
        runner.setup(ctx)
        runner.run(ctx)
    finally:
        runner.teardown(ctx)
    return 0


def _exit_now(code: int) -> None:
    """Leave without the interpreter's teardown: the rank's files are written and its process group
    destroyed, and finalizers of torch's communication threads at exit can only turn a finished
    rank into an aborted one."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        _exit_now(1)
    _exit_now(code)
