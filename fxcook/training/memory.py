"""Peak training memory: CUDA's allocator peak on GPU, the process's sampled RSS peak on CPU.

On CPU torch tensors are not seen by tracemalloc (they bypass Python's allocator), so the meter
samples the resident set size (/proc/self/statm, else resource's ru_maxrss) every 5 ms in a thread
and reports the peak's rise over the RSS at the start: the memory training itself added (weights
already loaded are not counted). Memory the allocator kept from earlier work in the process can
hide part of that rise, so compare runs made in fresh processes.
"""

from __future__ import annotations

import os
import resource
import threading

import torch

__all__ = ["PeakMemory"]


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.bytes` (peak added during the block) and `m.how`."""

    def __init__(self, device: torch.device, every: float = 0.005):
        self.device, self.every, self.bytes = device, every, 0
        self.how = "cuda max_memory_allocated" if device.type == "cuda" else "process RSS peak over start, sampled 5 ms"
        self._stop = threading.Event()

    def _sample(self, start: int) -> None:
        peak = start
        while not self._stop.wait(self.every):
            peak = max(peak, _rss())
        self.bytes = max(peak, _rss()) - start

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(_rss(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
