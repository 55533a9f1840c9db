"""Test set-up: 8 fake CPU devices so sharding tests run on one machine.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here at the top.
"""
import os
import sys

# `python -m pytest` puts the repository root on sys.path, where the top-level `kernels/` folder
# (shipped as `unimm_jax.kernels`) would shadow PyPI's `kernels` package, which transformers
# (>= 5.2x) imports: every transformers-backed test would fail with "cannot import name ... from
# 'kernels'". The installed package never needs the root on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != os.path.realpath(_ROOT)]

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
