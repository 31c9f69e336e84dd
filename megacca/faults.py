"""Test-only fault injection: SIGKILL the process at a named point of a run, to test crash safety and resume.

This module is the only place that reads these variables. With none of them set, `maybe_kill` returns at once
and a run is unaffected.

    MEGACCA_TEST_KILL_AFTER_STEP=K   point "after_step": step K is done and logged, its checkpoint (if one is
                                     due) is not yet written, so a resume repeats the steps after the last one
    MEGACCA_TEST_KILL_IN_SAVE=K      point "in_save": rank 0, inside the save of step K, after every rank has
                                     written and fsynced its files, before the checkpoint is renamed into
                                     place and `latest` moves to it

SIGKILL, not an exception or sys.exit: a real crash (OOM killer, preemption, power loss) runs no `finally`
blocks, atexit handlers or flushes, and the tests must see what such a crash leaves behind.
"""
from __future__ import annotations

import os
import signal

ENV = {"after_step": "MEGACCA_TEST_KILL_AFTER_STEP", "in_save": "MEGACCA_TEST_KILL_IN_SAVE"}


def maybe_kill(point: str, step: int) -> None:
    """SIGKILL this process if the variable for `point` (a key of ENV) names `step`."""
    value = os.environ.get(ENV[point])
    if value is None:
        return
    try:
        target = int(value)
    except ValueError:
        raise ValueError(f"{ENV[point]}={value!r}: expected a step number") from None
    if target == step:
        os.kill(os.getpid(), signal.SIGKILL)
