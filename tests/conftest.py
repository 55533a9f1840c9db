"""Test set-up: 8 fake CPU devices so sharding tests run on one machine.

XLA_FLAGS must be set before jax is imported anywhere, so it lives here at the top.
"""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
