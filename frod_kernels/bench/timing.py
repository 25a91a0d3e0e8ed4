"""Timing, peak memory, a progress bar and a description of the machine.

Timing protocol (``time_interleaved``): every method runs ``warmup`` untimed rounds, then
``repeats`` rounds in which the methods take turns (the starting method rotates each round, so
slow drifts of the machine hit every method alike). Each timed call is bracketed by a device
synchronisation (CUDA events on GPU); ``between`` hooks (optimizer-like updates, zeroing
gradients) run outside the timed region. Reported: the median and the quartiles per method.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "Progress", "Timed", "load_warning", "machine_info", "peak_memory", "summarize", "time_interleaved", "tune_malloc",
]

_MALLOC_TUNED = False


@dataclass
class Timed:
    """One benchmarked callable: ``run`` is timed, ``between`` (if any) runs after it, untimed."""

    run: Callable[[], object]
    between: Callable[[], None] | None = None


class Progress:
    """A one-line progress bar on stderr (drawn only when stderr is a terminal and ``enabled``)."""

    def __init__(self, total: int, label: str, enabled: bool = True, width: int = 28) -> None:
        self.total, self.label, self.width, self.done = max(total, 1), label, width, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()

    def update(self, note: str = "", step: int = 1) -> None:
        self.done = min(self.done + step, self.total)
        if not self.enabled:
            return
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.started
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:5.0f}s {note[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by one call of ``fn`` (CUDA events on GPU, perf_counter after a sync elsewhere)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    _sync(device)
    started = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - started


def time_interleaved(
    methods: dict[str, Timed], device: torch.device, warmup: int = 2, repeats: int = 7,
    progress: Progress | None = None,
) -> dict[str, list[float]]:
    """Per method, ``repeats`` wall times in seconds of ``run`` (see the module docstring)."""
    names = list(methods)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(warmup + repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            t = _time_once(methods[name].run, device)
            if methods[name].between is not None:
                methods[name].between()
            if round_ >= warmup:
                samples[name].append(t)
        if progress is not None:
            progress.update()
    return samples


def summarize(seconds: list[float]) -> dict[str, float]:
    """Median and quartiles in milliseconds; the quartiles lie between the smallest and largest sample."""
    ms = sorted(s * 1e3 for s in seconds)
    if len(ms) == 1:
        return {"ms": ms[0], "q25_ms": ms[0], "q75_ms": ms[0]}
    # 'inclusive': the default 'exclusive' method extrapolates beyond the samples when there are few
    # (two samples 10 and 20 would give quartiles 7.5 and 22.5; a wide spread, negative ones).
    q = statistics.quantiles(ms, n=4, method="inclusive")
    return {"ms": statistics.median(ms), "q25_ms": q[0], "q75_ms": q[2]}


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence file descriptor 2 (the profiler's native library logs start/stop lines there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated by one call of ``fn`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocator's events recorded by the
    PyTorch profiler (``profile_memory=True``), summed in time order.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns(),
    )
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def tune_malloc() -> bool:
    """Make glibc keep freed tensor memory for reuse instead of returning it to the kernel.

    By default glibc serves blocks above its mmap threshold with mmap and gives them back with
    munmap, so every large temporary is faulted in page by page again. Where page faults are
    expensive (sandboxed or virtualised machines: on the machine the committed results come from,
    a 256 × 1024 float32 add took 8 ms instead of 0.1 ms) that cost swamps the arithmetic being
    measured. Raising M_MMAP_THRESHOLD and M_TRIM_THRESHOLD (``mallopt``) for this process has the
    effect of the usual jemalloc/tcmalloc advice for PyTorch on CPU. Returns True if applied
    (glibc only).
    """
    global _MALLOC_TUNED
    if not sys.platform.startswith("linux"):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
    _MALLOC_TUNED = _MALLOC_TUNED or ok
    return ok


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_warning(info: dict, threshold: float = 0.25) -> str | None:
    """A warning when the 1-minute load average in ``info`` (``machine_info``) exceeds ``threshold`` ×
    the CPU count: other processes then share the cores and CPU timings are unreliable."""
    load, cpus = info.get("load_average_1min"), info.get("cpu_count") or 1
    if load is None or load <= threshold * cpus:
        return None
    return (f"warning: the load average is {load:.2f} on {cpus} CPUs: other processes are running, "
            "CPU timings will be slower and noisier than on a quiet machine")


def machine_info(device: torch.device | None = None) -> dict:
    """Date, machine, threads and package versions, stored with every result file."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in ("frod_kernels", "torch", "triton", "numpy", "transformers", "peft")},
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "malloc_tuned": _MALLOC_TUNED,
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
