"""Stopping a run on request without losing work: what schedulers send before they kill a job.

    with StopSignals() as signals:          # SIGTERM, SIGINT, SIGUSR1
        while training:
            ...
            if world.any_rank([signals.received is not None])[0]: save, then raise Preempted

Slurm (`--signal=B:USR1@120`, or SIGTERM at the end of a job's time or on preemption) and Kubernetes (SIGTERM,
then SIGKILL after terminationGracePeriodSeconds) give a job a warning before the kill. The first signal asks the
run to finish its current step, save a checkpoint and exit with PREEMPTED_EXIT_CODE; a second one exits at once
(the last complete checkpoint stays intact: saves are atomic). Under torchrun the signal may reach only some
ranks: the loop all-reduces the request with the step's other flags, so every rank saves at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # SIGUSR1 does not exist on Windows: skipped there


class StopSignals:
    def __init__(self):
        self.received: str | None = None  # the name of the first signal
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to it alone
            for name in STOP_SIGNALS:
                if hasattr(signal, name):
                    number = getattr(signal, name)
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.received is not None:
            sys.stderr.write(f"\n{name} again: exiting now without saving; the last complete checkpoint is kept\n")
            sys.stderr.flush()
            os._exit(128 + number)  # the conventional status of a process killed by this signal
        self.received = name
        sys.stderr.write(f"\n{name}: saving a checkpoint after this step, then exiting (send it again to exit at "
                         "once)\n")
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


class SaveTimer:
    """train.save_every_minutes: whether that much wall-clock time passed since the last save (0: never)."""

    def __init__(self, minutes: float):
        self.seconds = minutes * 60
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.seconds > 0 and time.monotonic() - self.last >= self.seconds

    def reset(self) -> None:
        self.last = time.monotonic()
