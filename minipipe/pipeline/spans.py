"""When each action of a step ran, on the clock of the device that ran it.

CPU: host time (perf_counter) is compute time. CUDA: the host only queues kernels, so host time
says when work was queued, not when it ran, and a `torch.cuda.synchronize()` per action to make
it honest would also wait for the NCCL receives posted in advance: neighbouring stages would wait
on each other and the measured step would be another schedule. So on CUDA each mark is an event
recorded on the compute stream (no wait), and the spans are read once, after the step, from the
events' elapsed times. They are put on the host clock at the one moment both clocks agree: the
host has just waited for the gradient-norm all-reduce (`synced`), so host time then is that
all-reduce's end on the device. Every rank leaves that all-reduce together, which is also the
timeline's common clock (minipipe/tracking/timeline.py).

On CUDA, marks are recorded only on timed steps (log and trace steps); the others record nothing.
"""
import time

import torch


class SpanRecorder:
    def __init__(self, device: torch.device):
        self.on_cuda = torch.device(device).type == "cuda"
        self.enabled = not self.on_cuda
        self.sync_point = 0.0  # host time when the step's grad-norm all-reduce ended
        self._marks: list[tuple] = []  # (kind, micro-batch, chunk, start mark, end mark)
        self._origin = self._anchor = None
        self._spans = None

    def begin_step(self, timed: bool) -> None:
        self.enabled = timed or not self.on_cuda
        self._marks, self._spans, self._anchor = [], None, None
        self._origin = self.mark()

    def mark(self):
        """Now, on the compute stream (an event) or the host (seconds); None when not recording."""
        if not self.enabled:
            return None
        if not self.on_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def add(self, kind: str, microbatch, chunk, start, end) -> None:
        if self.enabled:
            self._marks.append((kind, microbatch, chunk, start, end))

    def synced(self, anchor) -> None:
        """The host has just waited for the device past `anchor` (a mark): both clocks agree now."""
        self.sync_point, self._anchor = time.perf_counter(), anchor

    def spans(self) -> list[tuple]:
        """(kind, micro-batch, chunk, start s, end s) of the last step on the host clock."""
        if self._spans is None:
            self._spans = self._marks if not self.on_cuda else self._from_events()
        return self._spans

    def _from_events(self) -> list[tuple]:
        if not self._marks or self._anchor is None:
            return []
        self._marks[-1][4].synchronize()  # the optimizer step's end: every mark has completed
        anchor_ms = self._origin.elapsed_time(self._anchor)

        def host(event):
            return self.sync_point + (self._origin.elapsed_time(event) - anchor_ms) / 1e3
        return [(kind, m, chunk, host(start), host(end)) for kind, m, chunk, start, end in self._marks]
