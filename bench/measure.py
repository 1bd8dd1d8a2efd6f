"""Timing and peak-memory measurement of one callable.

Time
* GPU: `triton.testing.do_bench` (CUDA events, L2 flushed between calls, median) for calls
  under 50 ms; slower calls (the loop baselines) are timed with CUDA events directly, a few
  repeats, so that one row does not cost minutes. Falls back to CUDA events without triton.
* CPU: time.perf_counter around each call after one warm-up call; the number of repeats
  adapts to the time budget (at least `min_repeats`, which is 1 in the quick and tiny
  plans: there a slow baseline is timed once after its warm-up); the median is reported.
The warm-up (first) call is reported separately: it holds compilation / autotuning /
allocation costs (torch.compile's compile time shows there).
A call slower than `single_over_s` (when given; the GPU check's budget) is measured once
after the warm-up: that one call gives both the time (time.perf_counter around the memory
call, whose extra synchronisations are negligible at seconds) and the peak memory. With
`warmup_only_over_s`, the warm-up call itself is a memory call, and one slower than that is
not repeated at all: its time (compile / autotune included) is the measurement, with
repeats = 0 to say so.

Peak memory, one extra call (not a timing sample)
* GPU: torch.cuda.max_memory_allocated() after reset_peak_memory_stats(), minus the memory
  allocated before the call: the call's own peak (its outputs included).
* CPU: the process' resident-set high-water mark (VmHWM in /proc/self/status) is reset to
  the current RSS by writing 5 to /proc/self/clear_refs (Linux >= 4.0); after the call,
  peak = VmHWM - RSS before the call. For the RSS to follow the live tensors, glibc malloc is
  told (mallopt) during the memory call only to serve blocks >= 64 KiB with fresh mmaps and
  to give freed memory back at once, and its free heap pages are first returned to the OS
  (malloc_trim), so that reusing them faults pages in and counts. Memory reused within
  partly-used pages is not seen (a lower bound: tiny shapes read ~0). Timed calls run with thresholds close to
  glibc's own steady state (blocks up to 32 MiB reused from the heap), so that timings do not
  pay page faults that an ordinary process would not. Without clear_refs: the increase of
  ru_maxrss, which only sees a call that sets a new process peak (method recorded per row).
"""
from __future__ import annotations

import ctypes
import resource
import statistics
import time
from typing import Callable, NamedTuple, Optional

import torch

SLOW_GPU_CALL_S = 0.05
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


class Timing(NamedTuple):
    median_s: float
    min_s: float
    repeats: int
    first_s: float


class Memory(NamedTuple):
    peak_bytes: Optional[float]
    method: str
    result: object = None          # what the measured call returned


# (mmap threshold, trim threshold) of glibc malloc for timed calls and for the memory call.
_TIMING_MALLOC = (32 * 2**20, 64 * 2**20)    # glibc's dynamic thresholds at their maximum
_MEMORY_MALLOC = (64 * 2**10, 64 * 2**10)
_malloc_tunable = False


def _malloc_trim() -> None:
    """Give malloc's free heap pages back to the OS, so reusing them during the measured call
    faults pages in again and shows in the RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return (libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
                and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1)
    except (OSError, AttributeError):
        return False


def configure_cpu_allocator() -> bool:
    """Switch on the malloc settings of the module doc (timing settings now, memory settings
    around each memory call). Returns False where that is not possible (not glibc)."""
    global _malloc_tunable
    _malloc_tunable = _mallopt(*_TIMING_MALLOC)
    return _malloc_tunable


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_call(fn: Callable, device: torch.device, *, budget_s: float, min_repeats: int = 3,
                 max_repeats: int = 50, single_over_s: Optional[float] = None,
                 warmup_only_over_s: Optional[float] = None):
    """(Timing, Memory) of fn on `device`: a warm-up call, the memory call, then the timed
    repeats (see module doc)."""
    start = time.perf_counter()
    warm_memory = peak_memory(fn, device) if warmup_only_over_s is not None else fn()
    synchronize(device)
    first = time.perf_counter() - start
    if warmup_only_over_s is not None and first > warmup_only_over_s:
        return Timing(first, first, 0, first), warm_memory
    del warm_memory
    if single_over_s is not None and first > single_over_s:
        start = time.perf_counter()
        memory = peak_memory(fn, device)
        seconds = time.perf_counter() - start
        return Timing(seconds, seconds, 1, first), memory
    memory = peak_memory(fn, device)
    if device.type == "cuda":
        return _time_cuda(fn, device, first, budget_s, min_repeats, max_repeats), memory
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), len(times), first), memory


def _time_cuda(fn, device, first, budget_s, min_repeats, max_repeats) -> Timing:
    if first < SLOW_GPU_CALL_S:
        try:
            import triton.testing

            rep_ms = max(25.0, min(budget_s * 1e3, 200.0))
            median_ms, min_ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms,
                                                        quantiles=[0.5, 0.0])
            repeats = max(1, int(rep_ms / max(median_ms, 1e-3)))
            return Timing(median_ms / 1e3, min_ms / 1e3, repeats, first)
        except ImportError:
            pass
    repeats = int(min(max_repeats, max(min_repeats, budget_s / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) / 1e3)
    return Timing(statistics.median(times), min(times), repeats, first)


def _proc_status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable, device: torch.device) -> Memory:
    """Peak memory of one call of fn (see module doc for the method), and its result.
    Both methods measure from the memory in use just before the call, so garbage left by
    earlier rows does not distort the number (no gc.collect: it costs ~0.2 s a call)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return Memory(float(peak), "cuda.max_memory_allocated", result)
    if _malloc_tunable:
        _mallopt(*_MEMORY_MALLOC)
        _malloc_trim()
    try:
        if _reset_rss_peak():
            before = _proc_status_bytes("VmRSS")
            result = fn()
            peak = _proc_status_bytes("VmHWM")
            if before is not None and peak is not None:
                return Memory(float(max(0, peak - before)), "rss-hwm (clear_refs)", result)
            del result
    finally:
        if _malloc_tunable:
            _mallopt(*_TIMING_MALLOC)
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = fn()
    after_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return Memory(float((after_kib - before_kib) * 1024), "ru_maxrss delta (lower bound)", result)
