"""Conversion streams: peak RSS stays near one copy of the checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from unimm_jax.convert.checkpoints import abstract_params, hf_plan
from unimm_jax.convert.janus_config_io import hf_config_from
from unimm_jax.convert.safetensors_io import PlannedTensor, write_sharded
from unimm_jax.models.janus_config import tiny_janus_config

MEASURE = r"""
import resource, sys
from unimm_jax.cli.convert import main
code = main(sys.argv[1:])
print("PEAK_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def synthetic_hf_checkpoint(path, target_bytes=1 << 30):
    """A random Janus checkpoint of about `target_bytes` float32, written tensor by tensor."""
    cfg = tiny_janus_config(vocab_size=60000, hidden_size=1024, num_heads=16, num_kv_heads=16,
                            intermediate_size=4096, num_layers=8, vq_channel_multiplier=(1, 1))
    cfg.vq.image_size = 8  # 4x4 VQ grid == 32/8 vision grid
    shapes = abstract_params(cfg)
    fake = {}

    def build(tree):
        return {k: build(v) if isinstance(v, dict) else np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), v.shape, [0] * len(v.shape)) for k, v in tree.items()}

    fake = build(shapes)
    rng = np.random.default_rng(0)
    plan = [PlannedTensor(t.name, t.shape, t.dtype, lambda t=t: rng.standard_normal(t.shape, np.float32)) for t in hf_plan(fake, cfg)]
    total = sum(t.nbytes for t in plan)
    os.makedirs(path, exist_ok=True)
    write_sharded(str(path), plan, max_shard_bytes=256 << 20)
    config, generation = hf_config_from(cfg, "float32")
    json.dump(config, open(os.path.join(path, "config.json"), "w"), default=list)
    json.dump(generation, open(os.path.join(path, "generation_config.json"), "w"))
    return total


def peak_rss(*args):
    out = subprocess.run([sys.executable, "-c", MEASURE, *map(str, args)], capture_output=True, text=True,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.split("PEAK_KB")[1]) * 1024


def baseline_rss():
    out = subprocess.run([sys.executable, "-c", "import resource, unimm_jax.cli.convert, orbax.checkpoint, jax; jax.numpy.zeros(1);"
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    return int(out.stdout) * 1024


@pytest.mark.parametrize("route", [("hf", "deepseek"), ("hf", "hf")])
def test_conversion_peak_memory_near_one_copy(tmp_path_factory, route):
    src = tmp_path_factory.getbasetemp() / "mem_src"
    if not (src / "config.json").exists():
        synthetic_hf_checkpoint(src)
    size = sum(os.path.getsize(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
    assert size > 0.9e9
    dst = tmp_path_factory.mktemp("dst") / "out"
    peak = peak_rss("--from", route[0], "--to", route[1], src, dst)
    base = baseline_rss()
    print(f"{route}: checkpoint {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB, interpreter baseline {base / 1e9:.2f} GB")
    assert peak < 1.5 * size, f"peak RSS {peak / 1e9:.2f} GB >= 1.5 x {size / 1e9:.2f} GB"
