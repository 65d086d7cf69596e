"""Faults on demand, for crash tests: the worker calls these at named points of a shard's run.

Set by environment variable (tests set them on a worker subprocess); unset, each call is a
dictionary lookup and nothing else.
  FLEXJOB_TEST_KILL_AT=prefill|decode:<step>|after_progress|before_commit|during_commit
      the worker SIGKILLs itself there (a real crash: no cleanup, no finally blocks);
      before_commit and during_commit (inside the open commit transaction, every write done)
      aim at the first part with generated rows
  FLEXJOB_TEST_POISON_ROW=<row>
      any engine call whose block includes that input row raises PoisonRowError
"""
from __future__ import annotations

import os
import signal
from collections.abc import Iterable

KILL_AT = "FLEXJOB_TEST_KILL_AT"
POISON_ROW = "FLEXJOB_TEST_POISON_ROW"


class PoisonRowError(RuntimeError):
    pass


def kill_point(name: str, step: int | None = None) -> None:
    spec = os.environ.get(KILL_AT)
    if spec and (spec == name or (step is not None and spec == f"{name}:{step}")):
        os.kill(os.getpid(), signal.SIGKILL)


def raise_if_poisoned(rows: Iterable[int]) -> None:
    poison = os.environ.get(POISON_ROW)
    if poison is not None and int(poison) in rows:
        raise PoisonRowError(f"test poison row {poison}")
