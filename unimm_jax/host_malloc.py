"""glibc malloc settings that stop XLA:CPU from page-faulting its buffers in on every step.

XLA:CPU allocates each execution's temporaries with posix_memalign and frees them when the call
ends. A buffer over 64 MiB requested from a thread other than the main one (XLA's worker
threads) cannot come from glibc's per-thread heaps, so glibc mmaps it fresh and munmaps it on
free, whatever the mmap threshold says. The default job's training step has one such buffer
(364 MiB at 16 x 256 tokens): every step the kernel zero-fills ~93k pages as XLA first writes
them (160k page faults/s, a third of the CPU time spent in the kernel on a 2-core VM).

`tune_host_malloc` makes every thread allocate from the main heap (M_ARENA_MAX=1), never by mmap
(M_MMAP_MAX=0), and keeps freed memory (M_TRIM_THRESHOLD): the buffer is carved from the heap
once and reused by the next step. benchmarks/host_malloc.py measures it; RESULTS.md has the
figures. The cost: the process keeps its peak heap, and threads share one malloc arena (fine
for XLA's few large allocations; a host running many malloc-heavy threads may prefer arenas).

It must run before the JAX backend starts its threads (a thread keeps the arena it first
allocated from); the CLIs call it first thing. On accelerator hosts (GPU/TPU) it does nothing by
default, as device memory does not come from malloc. Control it with UNIMM_HOST_MALLOC:
"auto" (default: tune when no accelerator is visible), "tuned" (always), "default" (never).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import platform

ENV_VAR = "UNIMM_HOST_MALLOC"
MODES = ("auto", "tuned", "default")

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
_KEEP_FREED = 2**31 - 1  # int max: never return the heap's top to the OS
_applied = False


def _accelerator_visible() -> bool:
    """Whether JAX may run on a GPU or TPU here (device files, or JAX_PLATFORMS naming one)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] not in ("cpu", "")
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def tune_host_malloc(mode: str | None = None) -> bool:
    """Applies the settings above (see the module docstring); returns whether they are in force.

    mode: "auto" | "tuned" | "default"; None reads $UNIMM_HOST_MALLOC (default "auto").
    A no-op (False) off Linux/glibc. Idempotent.
    """
    global _applied
    mode = (mode if mode is not None else os.environ.get(ENV_VAR, "auto")).strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {MODES}; unset it or pick one.")
    if _applied:
        return True
    if mode == "default" or (mode == "auto" and _accelerator_visible()):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success; apply all three or report failure.
    ok = all(libc.mallopt(param, value) == 1 for param, value in
             ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _KEEP_FREED)))
    _applied = ok
    return ok
