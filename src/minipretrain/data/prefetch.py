"""Each step's batches, built one step ahead in a background thread.

    loader = StepLoader(sampler, batch_size, grad_accum, world, causal, pin_memory=device.type == "cuda")
    data = loader.next()     # data.micro_batches, data.target_counts, data.drawn_before, data.state ...
    loader.close()

While the device runs step k, the thread draws and tensorises step k + 1, and may start on k + 2 (pinned, on CUDA,
so that the copy to the GPU is asynchronous). The sampler's position runs ahead of training, so every StepData
carries the position just after its own batches: checkpoints, the spike guard's records and per-source token
counts use that one, and a resumed run continues exactly after the last trained step, never after a prefetched
one. Only the thread touches the sampler once the loader runs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from dataclasses import dataclass

from minipretrain.data.batches import Batch
from minipretrain.model import prediction_targets


def target_count(batch: Batch, causal: bool) -> int:
    """The positions of a batch that are scored (have a label after the causal shift)."""
    return int((prediction_targets(batch.labels, causal) != -100).sum())


@dataclass
class StepData:
    micro_batches: list[Batch]  # this data-parallel rank's grad_accum micro-batches, on the CPU
    target_counts: list[int]  # predicted tokens of each micro-batch (host integers: no device read needed)
    drawn_before: list[int]  # the sampler's draws per source before this step
    drawn_after: list[int]  # ... and after it
    state: dict  # the sampler's state_dict after this step: what a checkpoint at this step records
    tokens_by_source: dict  # the sampler's tokens_by_source() after this step


class StepLoader:
    def __init__(self, sampler, batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, causal: bool,
                 pin_memory: bool = False):
        self.sampler, self.batch_size, self.grad_accum = sampler, batch_size, grad_accum
        self.dp_rank, self.dp_size, self.causal, self.pin_memory = dp_rank, dp_size, causal, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=1)  # one step ahead: the queue's slot plus the one in hand
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.wait_s = 0.0  # time the training loop spent waiting for batches, cumulative

    def _build(self) -> StepData:
        sampler = self.sampler
        before = list(sampler.drawn)
        micro = [sampler.next_batch(self.batch_size, self.dp_rank, self.dp_size) for _ in range(self.grad_accum)]
        if self.pin_memory:
            micro = [Batch(*(t.pin_memory() if t is not None else None for t in b)) for b in micro]
        counts = [target_count(b, self.causal) for b in micro]
        return StepData(micro, counts, before, list(sampler.drawn), sampler.state_dict(), sampler.tokens_by_source())

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                item = self._build()
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the training thread, which raises it
            self._queue.put(e)

    def next(self) -> StepData:
        start = time.perf_counter()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="step-loader", daemon=True)
            self._thread.start()
        item = self._queue.get()
        self.wait_s += time.perf_counter() - start
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread; what it prefetched is dropped (the sampler has moved past it: do not reuse it)."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.1)
            self._thread.join()
            self._thread = None
