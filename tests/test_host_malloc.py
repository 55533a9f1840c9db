"""unimm_jax.host_malloc: the glibc settings stop XLA:CPU's per-call page faults on big temporaries."""
import json
import os
import platform
import subprocess
import sys

import pytest

from unimm_jax import host_malloc

# A fresh process per mode (malloc settings must precede jax's threads): minor faults per call of
# a jitted function whose [4096, 4096] float32 intermediate (64 MiB) sits between two matmuls.
_PROBE = r"""
import json, resource, unimm_jax
from unimm_jax import host_malloc
import jax, jax.numpy as jnp
@jax.jit
def f(x):
    y = jnp.tanh(x @ x.T)
    return (y @ y[:, :64]).sum()
x = jnp.full((4096, 64), 0.01, jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
f(x).block_until_ready()
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    f(x).block_until_ready()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 5
print(json.dumps(dict(applied=host_malloc._applied, faults=faults, temp=temp)))
"""


def _probe(mode):
    env = dict(os.environ, UNIMM_HOST_MALLOC=mode, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_tuned_malloc_stops_per_call_page_faults():
    default, tuned = _probe("default"), _probe("tuned")
    assert default["temp"] >= 64 * 2**20  # the case the settings are for: over glibc's 64 MiB heap limit
    assert not default["applied"] and tuned["applied"]
    # Untuned, each call faults its 64 MiB in afresh (~16k pages); tuned, the heap is reused.
    assert default["faults"] > 8000, default
    assert tuned["faults"] < 0.5 * default["faults"], (tuned, default)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="UNIMM_HOST_MALLOC='fast' is not one of"):
        host_malloc.tune_host_malloc("fast")


def test_auto_mode_leaves_accelerator_hosts_alone(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert host_malloc._accelerator_visible()
    monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
    assert host_malloc._accelerator_visible()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not host_malloc._accelerator_visible()


def test_default_mode_does_nothing(monkeypatch):
    monkeypatch.setattr(host_malloc, "_applied", False)
    monkeypatch.setattr(host_malloc, "_glibc", lambda: pytest.fail("default mode must not touch malloc"))
    assert host_malloc.tune_host_malloc("default") is False
