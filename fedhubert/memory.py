"""Memory measurement for batch_size=auto and the training metrics: the peak memory of a block of
work (CUDA allocator peak, or the process's resident-set high-water mark on CPU), and the arithmetic
that turns measured peaks into the largest batch that fits a budget."""

from __future__ import annotations

import contextlib
import ctypes
import re
import resource
import sys
import threading
from typing import Any, Callable

import psutil
import torch

from fedhubert.config import Config

MiB = 2**20


class PeakMemory:
    """Peak memory of a block, in bytes above its start: CUDA allocator peak, or on CPU the
    process's resident-set high-water mark (Linux resets it via /proc/self/clear_refs; elsewhere a
    sampling thread watches the RSS)."""

    def __init__(self, device: torch.device):
        self.device, self.start, self.peak_bytes, self._sampled = device, 0, 0, 0
        self._stop, self._thread = threading.Event(), None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        _trim_malloc()  # return freed heap pages, so reused pages do not hide new memory
        self.start = psutil.Process().memory_info().rss
        if not reset_rss_peak():
            self._sampled = self.start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, proc.memory_info().rss)

    def so_far(self) -> int:
        """The peak so far, in bytes above the block's start (inside the block)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            peak = max(self._sampled, psutil.Process().memory_info().rss)
        else:
            peak = _vm_hwm_bytes()
        return max(0, peak - self.start)

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        self.peak_bytes = self.so_far()


def reset_rss_peak() -> bool:
    """Resets the process's peak RSS (VmHWM) to its current RSS; False where Linux's
    /proc/self/clear_refs is not available."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_malloc() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


def process_peak_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA max allocated, or the process's peak RSS (since the last reset)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    with contextlib.suppress(OSError, AttributeError):
        return _vm_hwm_bytes() / MiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def batch_from_budget(budget: float, fixed: float, per_sample: float, cap: int) -> int:
    """Largest batch with ``fixed + per_sample * B <= budget``, clamped to [1, cap]."""
    if per_sample <= 0:
        return cap
    return int(max(1, min(cap, (budget - fixed) // per_sample)))


def largest_fitting(fits: Callable[[int], bool], cap: int) -> int:
    """Largest b in [1, cap] with ``fits(b)`` for a monotone ``fits``: doubling, then bisecting the
    last gap (about 2·log2(cap) calls). 0 when not even 1 fits."""
    if not fits(1):
        return 0
    good, bad = 1, cap + 1  # fits(good) held; fits(bad) failed (cap + 1: never tried)
    while good < cap:
        trial = min(2 * good, cap)
        if not fits(trial):
            bad = trial
            break
        good = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def memory_budget(cfg: Config, device: torch.device) -> float:
    """Bytes for training: training.memory_budget_gb (GiB), else half the free memory; on a GPU shared by
    simulated clients (federation.client_num_gpus below 1), half of at most this client's share of it."""
    if cfg.training.memory_budget_gb > 0:
        return cfg.training.memory_budget_gb * 2**30
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return min(free, total * gpu_share(cfg)) / 2
    return psutil.virtual_memory().available / 2


def gpu_share(cfg: Config) -> float:
    """The share of its GPU a simulated client may fill: federation.client_num_gpus when a fraction (Ray
    puts 1 / fraction clients on one GPU, which probe and train at once), else all of it."""
    share = cfg.federation.client_num_gpus
    return float(share) if isinstance(share, float) and 0 < share < 1 else 1.0
