"""Conversion streams: peak RSS stays near one copy of the checkpoint."""
import functools
import json
import os
import subprocess
import sys
import weakref

import numpy as np
import pytest

from unimm_jax.convert.checkpoints import abstract_params, hf_plan
from unimm_jax.convert.janus_config_io import hf_config_from
from unimm_jax.convert.safetensors_io import PlannedTensor, SafetensorsReader, write_sharded
from unimm_jax.models.janus_config import tiny_janus_config

# The child's own peak: VmHWM belongs to the address space exec created. ru_maxrss would not do:
# Linux carries the parent's peak across fork+exec, so a pytest process that grew to 1.2 GB in
# earlier tests made every route "peak" at 1.2 GB.
PEAK_KB = r"""
def peak_kb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except OSError:  # not Linux: ru_maxrss (KB on Linux, bytes on macOS; only Linux runs CI)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
MEASURE = PEAK_KB + r"""
import sys
from unimm_jax.cli.convert import main
code = main(sys.argv[1:])
print("PEAK_KB", peak_kb())
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


@functools.lru_cache(maxsize=None)
def baseline_rss():
    out = subprocess.run([sys.executable, "-c", PEAK_KB + "import unimm_jax.cli.convert, orbax.checkpoint, jax\n"
                          "jax.numpy.zeros(1)\nprint(peak_kb())"],
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""})
    return int(out.stdout) * 1024


@pytest.fixture(scope="module")
def mem_src(tmp_path_factory):
    """(path, bytes) of the ~1 GB synthetic hf checkpoint, built once per module."""
    src = tmp_path_factory.getbasetemp() / "mem_src"
    if not (src / "config.json").exists():
        synthetic_hf_checkpoint(src)
    size = sum(os.path.getsize(src / f) for f in os.listdir(src) if f.endswith(".safetensors"))
    assert size > 0.9e9
    return src, size


@pytest.fixture(scope="module")
def to_unimm(mem_src, tmp_path_factory):
    """hf -> unimm of the synthetic checkpoint: (unimm dir, peak RSS), measured once and reused
    as the source of the unimm -> hf route."""
    dst = tmp_path_factory.mktemp("unimm") / "out"
    return dst, peak_rss("--from", "hf", "--to", "unimm", mem_src[0], dst)


def check_peak(route, peak, size):
    base = baseline_rss()
    print(f"{route}: checkpoint {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB ({peak / size:.2f}x), "
          f"interpreter baseline {base / 1e9:.2f} GB")
    assert peak < 1.5 * size, f"{route}: peak RSS {peak / 1e9:.2f} GB >= 1.5 x {size / 1e9:.2f} GB"


@pytest.mark.parametrize("route", [("hf", "deepseek"), ("hf", "hf")])
def test_conversion_peak_memory_near_one_copy(mem_src, tmp_path_factory, route):
    src, size = mem_src
    dst = tmp_path_factory.mktemp("dst") / "out"
    check_peak(route, peak_rss("--from", route[0], "--to", route[1], src, dst), size)


def test_hf_to_unimm_peak_memory_near_one_copy(mem_src, to_unimm):
    dst, peak = to_unimm
    groups = [d for d in os.listdir(dst / "params") if d.startswith("group_")]
    assert len(groups) > 1  # written as several bounded orbax items, not one tree
    check_peak(("hf", "unimm"), peak, mem_src[1])


def test_unimm_to_hf_peak_memory_near_one_copy(mem_src, to_unimm, tmp_path_factory):
    src, size = mem_src
    dst = tmp_path_factory.mktemp("dst") / "out"
    check_peak(("unimm", "hf"), peak_rss("--from", "unimm", "--to", "hf", to_unimm[0], dst), size)
    # The round trip is bit exact, tensor by tensor (read with the streaming reader: no 1 GB dicts).
    a, b = SafetensorsReader.from_dir(str(src)), SafetensorsReader.from_dir(str(dst))
    assert sorted(a.keys()) == sorted(b.keys())
    for k in a.keys():
        np.testing.assert_array_equal(a.read(k), b.read(k), err_msg=k)


class CountingLeaf:
    """A lazy leaf that records every array it hands out, to see how many are alive at once."""

    def __init__(self, value, log):
        self.value, self.log = value, log
        self.shape, self.dtype = value.shape, value.dtype

    def __array__(self, dtype=None, copy=None):
        alive = sum(r().nbytes for r in self.log if r() is not None)
        self.log.max_alive = max(getattr(self.log, "max_alive", 0), alive)
        a = self.value.copy()
        self.log.append(weakref.ref(a))
        return a


class Log(list):
    pass


def test_params_groups_stream_lazy_leaves_and_round_trip(tmp_path):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from unimm_jax.convert.safetensors_io import CheckpointError
    from unimm_jax.convert.unimm_format import (ParamsReader, restore_params_groups, save_params_groups)

    rng = np.random.default_rng(0)
    sizes = {"a": (10, 10), "b": (10, 10), "c": (8, 100), "d": (10, 10), "e": (30,)}  # c: 3200 bytes
    values = {"blk": {k: rng.standard_normal(s).astype(np.float32) for k, s in sizes.items()}, "top": np.arange(64.0)}
    log = Log()
    lazy = jax.tree.map(lambda v: CountingLeaf(v, log), values)
    save_params_groups(tmp_path / "p", lazy, group_bytes=1000)
    # Groups in path order: [a,b] (800 B), [c] (alone: bigger than the bound), [d,e] (520 B), [top] (512 B).
    reader = ParamsReader(tmp_path / "p")
    assert [paths for _, paths in reader.groups] == [
        [("blk", "a"), ("blk", "b")], [("blk", "c")], [("blk", "d"), ("blk", "e")], [("top",)]]
    # Each leaf is read once, and only while its group is saved: earlier groups are released.
    assert len(log) == 6 and 0 < log.max_alive <= 1000
    assert reader.leaves[("blk", "c")] == ((8, 100), np.dtype(np.float32))

    back = reader.read_all()
    jax.tree.map(np.testing.assert_array_equal, back, values)
    bf = reader.read(("blk", "c"), "bfloat16")
    assert bf.dtype == jnp.bfloat16
    np.testing.assert_array_equal(bf, values["blk"]["c"].astype(jnp.bfloat16))

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=NamedSharding(
        mesh, P("x") if v.shape[0] % 2 == 0 else P())), values)
    on_mesh = restore_params_groups(tmp_path / "p", target)
    assert on_mesh["blk"]["c"].sharding.spec == P("x") and on_mesh["blk"]["c"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(on_mesh["top"]), values["top"].astype(jnp.bfloat16))

    del target["blk"]["e"]
    with pytest.raises(ValueError, match="1 saved leaves have no target \\(first: blk/e\\)"):
        restore_params_groups(tmp_path / "p", target)
    target["blk"]["e"] = jax.ShapeDtypeStruct((31,), jnp.float32, sharding=NamedSharding(mesh, P()))
    with pytest.raises(ValueError, match=r"blk/e: target shape \(31,\) != saved shape \(30,\)"):
        restore_params_groups(tmp_path / "p", target)

    os.remove(tmp_path / "p" / "params_index.json")  # what an interrupted save leaves behind
    with pytest.raises(CheckpointError, match="incomplete"):
        ParamsReader(tmp_path / "p")
    with pytest.raises(FileNotFoundError):
        ParamsReader(tmp_path / "nothing")
