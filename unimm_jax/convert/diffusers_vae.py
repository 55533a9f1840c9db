"""diffusers `AutoencoderKL` state dict <-> `unimm_jax.models.vae` params, both ways, bit-exact.

The Flax tree mirrors diffusers' module tree, so one rule converts every tensor:

  key:    `encoder.down_blocks.0.resnets.1.conv1.weight` <-> ('encoder','down_blocks_0','resnets_1','conv1','kernel')
          (a numeric key part is folded into the name before it; `to_out.0` -> `to_out_0`)
  leaf:   4-D weight (conv, OIHW)  <-> kernel HWIO   (transpose (2,3,1,0) / (3,2,0,1))
          2-D weight (Linear, out x in) <-> kernel (in x out)
          1-D weight (GroupNorm)   <-> scale;  bias <-> bias

Only transposes happen, so `vae_to_torch(vae_from_torch(sd, cfg)) == sd` bit for bit (dtype kept).
Old diffusers checkpoints name the mid-block attention `query/key/value/proj_attn`; those are
renamed on the way in (torch direction always writes the current `to_q/to_k/to_v/to_out.0`).
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from unimm_jax.models.vae import AutoencoderKL, VAEConfig

_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_INDEXED = re.compile(r"^(.*)_(\d+)$")
# torch ModuleList/Sequential attributes whose index is folded into the Flax name. Only these
# are unfolded on the way back: names like `linear_1` or `conv1` are real attribute names.
VAE_LISTS = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "downsamplers", "upsamplers", "to_out"})


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """`a.b.0.c.weight` -> ('a', 'b_0', 'c', 'weight') (leaf name not yet renamed)."""
    out: list[str] = []
    for part in key.split("."):
        if part.isdigit():
            if not out:
                raise ValueError(f"state-dict key {key!r} starts with an index.")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def path_to_torch_key(path: Iterable[str], lists: frozenset[str] = VAE_LISTS) -> str:
    """Inverse of `torch_key_to_path` for module names: `X_N` -> `X.N` when X is in `lists`."""
    parts = []
    for name in path:
        m = _INDEXED.match(name)
        parts.extend([m.group(1), m.group(2)] if m and m.group(1) in lists else [name])
    return ".".join(parts)


def _flax_leaf(path: tuple[str, ...], ndim: int) -> tuple[str, ...]:
    """The Flax leaf name a torch `weight`/`bias` of `ndim` dims maps to."""
    *mods, leaf = path
    if leaf == "bias":
        return (*mods, "bias")
    if leaf != "weight":
        raise ValueError(f"unknown tensor kind {'.'.join(path)!r} (expected weight or bias).")
    return (*mods, "scale" if ndim == 1 else "kernel")


def _to_flax_array(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:  # OIHW -> HWIO
        return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
    if w.ndim == 2:  # (out, in) -> (in, out)
        return np.ascontiguousarray(w.T)
    return w


def _to_torch_array(w: np.ndarray) -> np.ndarray:
    if w.ndim == 4:  # HWIO -> OIHW
        return np.ascontiguousarray(np.transpose(w, (3, 2, 0, 1)))
    if w.ndim == 2:
        return np.ascontiguousarray(w.T)
    return w


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(flax_shape) == 4:
        h, w, i, o = flax_shape
        return (o, i, h, w)
    if len(flax_shape) == 2:
        return flax_shape[::-1]
    return tuple(flax_shape)


def _canonical_key(key: str) -> str:
    """Renames legacy attention keys (`...attentions.0.query.weight` -> `...to_q.weight`)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
        parts = parts[:-2] + _LEGACY_ATTENTION[parts[-2]].split(".") + parts[-1:]
    return ".".join(parts)


def expected_torch_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every diffusers key the model needs, with its torch shape (derived from the Flax init)."""
    s = 2 * config.downsample_factor
    x = np.zeros((1, s, s, config.in_channels), np.float32)
    shapes = jax.eval_shape(lambda: nn.unbox(AutoencoderKL(config).init(jax.random.PRNGKey(0), x)["params"]))
    out = {}
    for path, leaf in traverse_util.flatten_dict(shapes).items():
        out[path_to_torch_key(path[:-1]) + (".bias" if path[-1] == "bias" else ".weight")] = _torch_shape(leaf.shape)
    return out


class _Reader:
    """Uniform access to a dict of arrays or an open safetensors file, with legacy key renames."""

    def __init__(self, keys: Iterable[str], get):
        self._get = get
        self.by_canonical: dict[str, str] = {}
        for k in keys:
            self.by_canonical[_canonical_key(k)] = k

    def get(self, canonical: str) -> np.ndarray:
        return np.asarray(self._get(self.by_canonical[canonical]))


def _convert_in(reader: _Reader, config: VAEConfig, dtype, source: str) -> dict:
    expected = expected_torch_shapes(config)
    missing = [k for k in expected if k not in reader.by_canonical]
    unexpected = [reader.by_canonical[k] for k in reader.by_canonical if k not in expected]
    if missing or unexpected:
        msg = [f"{source} does not match VAEConfig(block_out_channels={config.block_out_channels}, "
               f"layers_per_block={config.layers_per_block}, latent_channels={config.latent_channels}):"]
        if missing:
            msg.append(f"  {len(missing)} missing tensor(s), e.g. {missing[:5]}")
        if unexpected:
            msg.append(f"  {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:5]}")
        msg.append("  Check that config.json belongs to these weights.")
        raise ValueError("\n".join(msg))
    flat = {}
    for key, want in expected.items():
        w = reader.get(key)
        if w.ndim == 4 and len(want) == 2 and w.shape[2:] == (1, 1):
            w = w[:, :, 0, 0]  # very old checkpoints stored attention projections as 1x1 convs
        if tuple(w.shape) != want:
            raise ValueError(
                f"{source}: tensor {reader.by_canonical[key]!r} has shape {tuple(w.shape)} but the "
                f"model expects {want} (torch layout). Check config.json against the weights."
            )
        if dtype is not None:
            w = w.astype(dtype)
        path = _flax_leaf(torch_key_to_path(key), w.ndim)
        flat[path] = _to_flax_array(w)
    return traverse_util.unflatten_dict(flat)


def vae_from_torch(state: Mapping[str, np.ndarray], config: VAEConfig, dtype=None) -> dict:
    """diffusers AutoencoderKL state dict (numpy arrays, torch layout) -> nested Flax params.

    `dtype=None` keeps each tensor's dtype (bit-exact); pass np.float32 to cast.
    Raises ValueError naming missing/unexpected keys or a key with both shapes.
    """
    return _convert_in(_Reader(state.keys(), state.__getitem__), config, dtype, "state dict")


def load_safetensors(path: str, config: VAEConfig, dtype=np.float32) -> dict:
    """Streams a diffusers `diffusion_pytorch_model.safetensors` tensor by tensor into Flax params."""
    from safetensors import safe_open

    # framework="flax" also reads bfloat16 files (numpy has no bf16); each tensor is pulled to
    # host memory on its own, so peak memory is one tensor beyond the converted params.
    with safe_open(path, framework="flax") as f:
        return _convert_in(_Reader(list(f.keys()), f.get_tensor), config, dtype, path)


def vae_to_torch(params: Mapping) -> dict[str, np.ndarray]:
    """Nested Flax params (plain or boxed arrays) -> diffusers state dict (numpy, torch layout)."""
    out = {}
    for path, leaf in traverse_util.flatten_dict(nn.unbox(dict(params))).items():
        *mods, name = path
        if name not in ("kernel", "scale", "bias"):
            raise ValueError(f"unexpected Flax param {'/'.join(path)!r} (expected kernel, scale or bias).")
        key = path_to_torch_key(mods) + (".bias" if name == "bias" else ".weight")
        out[key] = _to_torch_array(np.asarray(leaf))
    return out
