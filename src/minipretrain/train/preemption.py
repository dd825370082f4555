"""Stopping a run on request without losing work: what schedulers send before they kill a job.

    with StopSignals() as signals:          # SIGTERM, SIGINT, SIGUSR1
        while training:
            ...
            if world.any_rank([signals.received is not None])[0]: save, then raise Preempted

Slurm (`--signal=B:USR1@120`, or SIGTERM at the end of a job's time or on preemption) and Kubernetes (SIGTERM,
then SIGKILL after terminationGracePeriodSeconds) give a job a warning before the kill. The first signal asks the
run to finish its current step, save a checkpoint and exit with PREEMPTED_EXIT_CODE; a second one (2 s or more
later: a batch system may deliver one warning twice) exits at once, the last complete checkpoint intact. Under
torchrun the signal may reach only some ranks: the loop all-reduces the request with the step's other flags, so
every rank saves at the same step.
"""

from __future__ import annotations

import os
import signal
import threading
import time

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")  # SIGUSR1 does not exist on Windows: skipped there
REPEAT_GRACE_S = 2.0  # a second signal sooner than this is the first one delivered twice, not a second request


class StopSignals:
    def __init__(self):
        self.received: str | None = None  # the name of the first signal
        self._first = 0.0
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
        # os.write, not sys.stderr: the signal may land inside a write to stderr (the progress bar).
        if self.received is not None:
            if time.monotonic() - self._first < REPEAT_GRACE_S:
                return  # the same warning again through another path (Slurm signals torchrun and its workers)
            os.write(2, f"\n{name} again: exiting now without saving; the last complete checkpoint is kept\n".encode())
            os._exit(128 + number)  # the conventional status of a process killed by this signal
        self.received, self._first = name, time.monotonic()
        os.write(2, f"\n{name}: saving a checkpoint after this step, then exiting (send it again to exit at "
                    "once)\n".encode())

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
