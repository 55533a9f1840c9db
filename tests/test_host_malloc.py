"""unimm_jax.host_malloc: when the CLIs re-execute with glibc.malloc.hugetlb=1, and that the tunable
does what it is for (a large malloc'd buffer faults in 2 MiB pages, not 4 KiB ones)."""
import os
import subprocess
import sys

import pytest

from unimm_jax import host_malloc

needs_thp = pytest.mark.skipif(not host_malloc.hugetlb_available(), reason="needs Linux glibc >= 2.35 and THP not 'never'")


@pytest.fixture
def glibc_ok(monkeypatch):
    monkeypatch.setattr(host_malloc, "glibc_supports_hugetlb", lambda: True)


def test_with_hugetlb_keeps_other_tunables():
    assert host_malloc.with_hugetlb("") == "glibc.malloc.hugetlb=1"
    assert host_malloc.with_hugetlb("glibc.malloc.arena_max=2") == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert host_malloc.thp_mode(str(f)) == "madvise"
    f.write_text("[always] madvise never\n")
    assert host_malloc.thp_mode(str(f)) == "always"
    assert host_malloc.thp_mode(str(tmp_path / "missing")) is None


def test_hugetlb_environ_when_and_when_not(glibc_ok):
    cpu = {"JAX_PLATFORMS": "cpu", "PATH": "/bin"}
    env = host_malloc.hugetlb_environ(cpu, thp="madvise")
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1" and env["PATH"] == "/bin"
    assert env[host_malloc.REEXECUTED] == "1"
    # Nothing to do: opted out, already set, already re-executed, THP off, or an accelerator in auto mode.
    assert host_malloc.hugetlb_environ(dict(cpu, UNIMM_HOST_MALLOC="default"), thp="madvise") is None
    assert host_malloc.hugetlb_environ(dict(cpu, GLIBC_TUNABLES="glibc.malloc.hugetlb=0"), thp="always") is None
    assert host_malloc.hugetlb_environ(env, thp="madvise") is None
    assert host_malloc.hugetlb_environ(cpu, thp="never") is None
    assert host_malloc.hugetlb_environ(cpu, thp=None) is None
    gpu = {"JAX_PLATFORMS": "cuda"}
    assert host_malloc.hugetlb_environ(gpu, thp="madvise") is None
    assert host_malloc.hugetlb_environ(dict(gpu, UNIMM_HOST_MALLOC="hugetlb"), thp="madvise") is not None


def test_hugetlb_environ_off_glibc(monkeypatch):
    monkeypatch.setattr(host_malloc, "glibc_supports_hugetlb", lambda: False)
    assert host_malloc.hugetlb_environ({"JAX_PLATFORMS": "cpu"}, thp="madvise") is None
    assert not host_malloc.hugetlb_available("always")


def test_hugetlb_available_needs_thp(glibc_ok):
    assert host_malloc.hugetlb_available("madvise") and host_malloc.hugetlb_available("always")
    assert not host_malloc.hugetlb_available("never") and not host_malloc.hugetlb_available(None)


def test_bad_mode_names_the_variable(glibc_ok):
    with pytest.raises(ValueError, match="UNIMM_HOST_MALLOC='fast'.*auto"):
        host_malloc.hugetlb_environ({"UNIMM_HOST_MALLOC": "fast"}, thp="madvise")


REEXEC = """
import os, sys
print("start", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
from unimm_jax.host_malloc import reexec_with_hugetlb
reexec_with_hugetlb()
print("args", sys.argv[1:], os.environ.get("GLIBC_TUNABLES", ""))
"""


@needs_thp
def test_reexec_runs_the_same_command_once_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_malloc.ENV_VAR)}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", REEXEC, "a", "b c"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines == ["start ", "start glibc.malloc.hugetlb=1", "args ['a', 'b c'] glibc.malloc.hugetlb=1"], lines


# Minor page faults of first-touching a 256 MiB malloc'd buffer (mmapped by glibc), three times.
FAULTS = """
import ctypes, resource
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 256 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
"""


@needs_thp
def test_hugetlb_tunable_cuts_page_faults():
    def faults(tunables):
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    plain, huge = faults(""), faults(host_malloc.with_hugetlb(""))
    # 4 KiB pages: 65536 faults per call; 2 MiB pages: 128 (a few hundred if some fall back).
    assert plain > 30000, plain
    assert huge < plain / 8, (plain, huge)
