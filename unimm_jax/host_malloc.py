"""Transparent huge pages for XLA:CPU's per-call temporaries (glibc.malloc.hugetlb=1).

XLA:CPU allocates each execution's temporaries with posix_memalign and frees them when the call
ends. A buffer over 64 MiB requested from one of XLA's worker threads cannot come from glibc's
per-thread heaps, so glibc mmaps it fresh and munmaps it on free, whatever the mmap threshold
says. The default job's training step has one such buffer (364 MiB at 16 x 256 tokens): every
step the kernel faults in ~93k 4 KiB pages as XLA first writes them (160k faults/s, over a
quarter of the CPU time spent in the kernel on a 2-core VM).

With the glibc tunable `glibc.malloc.hugetlb=1` malloc madvises its mmapped chunks for
transparent huge pages, so the same buffer arrives in 2 MiB pages: ~350 faults per step instead
of ~94k (benchmarks/host_malloc.py; figures in benchmarks/RESULTS.md). Unlike M_ARENA_MAX=1
(which also stops the faults, tried and reverted in dc014bf), it leaves glibc's arenas alone, so
the many-small-op stages (VQ, SigLIP) keep their speed.

glibc reads tunables only at process start, so `reexec_with_hugetlb` re-executes the current
command line once with GLIBC_TUNABLES extended; unimm-train and unimm-eval call it first thing.
It does nothing off Linux/glibc, on glibc < 2.35 (no such tunable), when the kernel's THP mode
is "never", when an accelerator is visible (device memory does not come from malloc), or when
the tunable is already set. Control it with UNIMM_HOST_MALLOC: "auto" (default: as above),
"hugetlb" (also with an accelerator visible), "default" (never re-execute).
"""
from __future__ import annotations

import glob
import os
import platform
import sys

ENV_VAR = "UNIMM_HOST_MALLOC"
MODES = ("auto", "hugetlb", "default")
TUNABLE = "glibc.malloc.hugetlb"
REEXECUTED = "_UNIMM_HOST_MALLOC_REEXECUTED"  # set in the re-executed process: never twice
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def accelerator_visible(environ=None) -> bool:
    """Whether JAX may run on a GPU or TPU here (JAX_PLATFORMS in `environ` (default os.environ)
    naming one, or device files)."""
    platforms = (os.environ if environ is None else environ).get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] not in ("cpu", "")
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def glibc_supports_hugetlb() -> bool:
    """Linux with glibc >= 2.35 (the release that added glibc.malloc.hugetlb)."""
    if platform.system() != "Linux":
        return False
    libc, version = platform.libc_ver()
    if libc != "glibc":
        return False
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (2, 35)


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent-huge-page mode ("always" | "madvise" | "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def hugetlb_available(thp: str | None = "read") -> bool:
    """Whether the tunable can work here: Linux glibc >= 2.35 and a THP mode other than "never"
    (`thp`: the mode, "read" = read it from sysfs)."""
    return glibc_supports_hugetlb() and (thp_mode() if thp == "read" else thp) not in (None, "never")


def with_hugetlb(tunables: str) -> str:
    """GLIBC_TUNABLES value `tunables` (colon-separated name=value) with hugetlb=1 added."""
    parts = [p for p in tunables.split(":") if p]
    return ":".join(parts + [f"{TUNABLE}=1"])


def hugetlb_environ(environ=None, *, mode: str | None = None, thp: str | None = "read") -> dict | None:
    """The environment to re-execute with, or None when nothing should change (see module doc).

    environ: the current environment (default os.environ); mode: one of MODES (default
    $UNIMM_HOST_MALLOC, else "auto"); thp: the kernel THP mode ("read" = read it from sysfs).
    """
    environ = dict(os.environ if environ is None else environ)
    mode = (mode if mode is not None else environ.get(ENV_VAR, "auto")).strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {MODES}; unset it or pick one.")
    tunables = environ.get("GLIBC_TUNABLES", "")
    if mode == "default" or environ.get(REEXECUTED) or f"{TUNABLE}=" in tunables or not hugetlb_available(thp):
        return None
    if mode == "auto" and accelerator_visible(environ):
        return None
    environ["GLIBC_TUNABLES"] = with_hugetlb(tunables)
    environ[REEXECUTED] = "1"
    return environ


def reexec_with_hugetlb() -> None:
    """Re-executes this process's command line with glibc.malloc.hugetlb=1, when `hugetlb_environ`
    says so; otherwise returns. Call it before any work (it replaces the process)."""
    environ = hugetlb_environ()
    if environ is None:
        return
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, environ)
