"""Fault injection for crash-safety tests: `ENGINE_FAULT=<point>:<step>` SIGKILLs rank 0 there.

Points: `after_step` (after the step's optimizer update and metrics, before any checkpoint of that
step) and `in_save` (after every rank has written the checkpoint data, before it is made complete).
Unset in normal runs; reading one environment variable is its only cost.
"""

from __future__ import annotations

import os
import signal

from .comm import rank


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("ENGINE_FAULT")
    if not spec or rank() != 0:
        return
    where, _, at = spec.partition(":")
    if where == point and at.isdigit() and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)
