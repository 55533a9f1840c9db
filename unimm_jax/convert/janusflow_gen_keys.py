"""DeepSeek-original JanusFlow `vision_gen_enc_model.*` / `vision_gen_dec_model.*` <-> Flax params.

The torch names come from `janus/janusflow/models/uvit.py` (checked against the module tree it
builds for the JanusFlow-1.3B config):

  encoder: time_embed.linear_{1,2}.{weight,bias}         Linear (out,in)  <-> kernel (in,out)
           in_conv.{weight,bias}                          Conv OIHW        <-> kernel HWIO
           mid_block.res_blocks.N.depthwise.{weight,bias} Conv (C,1,7,7)   <-> kernel (7,7,1,C)
           mid_block.res_blocks.N.norm.weight             RMSNorm (C,)     <-> scale
           mid_block.res_blocks.N.channelwise_linear_{1,2}.{weight,bias}
           mid_block.res_blocks.N.channelwise_norm.{weight,bias}  GRN (1,1,1,4C) <-> gamma/beta (4C,)
           mid_block.res_blocks.N.cond_embeds_mapper.{weight,bias}  Linear(hidden, 2C)
  decoder: input_norm.weight, mid_block.res_blocks.N.*, out_convs.K.norm.weight,
           out_convs.K.unpatch_conv.{weight,bias}
(`time_proj` has no parameters.) Only transposes/reshapes happen, so both directions are
bit-exact inverses and keep each array's dtype.
"""
from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import linen as nn
from flax import traverse_util

from unimm_jax.convert.diffusers_vae import path_to_torch_key, torch_key_to_path
from unimm_jax.models.flow import ShallowUViTDecoder, ShallowUViTEncoder

ENCODER_PREFIX = "vision_gen_enc_model."
DECODER_PREFIX = "vision_gen_dec_model."
_GRN = "channelwise_norm"
_LISTS = frozenset({"res_blocks", "out_convs"})  # torch ModuleLists: `res_blocks.0` <-> `res_blocks_0`


def _leaf_from_torch(mods: tuple[str, ...], leaf: str, w: np.ndarray, key: str):
    """(flax path, flax array) for one torch tensor."""
    if mods and mods[-1] == _GRN:
        if w.ndim != 4 or w.shape[:3] != (1, 1, 1):
            raise ValueError(f"{key}: GRN parameter must have shape (1,1,1,C), got {w.shape}.")
        return (*mods, "gamma" if leaf == "weight" else "beta"), np.ascontiguousarray(w.reshape(-1))
    if leaf == "bias":
        return (*mods, "bias"), w
    if leaf != "weight":
        raise ValueError(f"{key}: unknown tensor kind {leaf!r} (expected weight or bias).")
    if w.ndim == 4:  # OIHW -> HWIO (depthwise: (C,1,k,k) -> (k,k,1,C))
        return (*mods, "kernel"), np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))
    if w.ndim == 2:
        return (*mods, "kernel"), np.ascontiguousarray(w.T)
    if w.ndim == 1:  # RMSNorm
        return (*mods, "scale"), w
    raise ValueError(f"{key}: unexpected {w.ndim}-D weight of shape {w.shape}.")


def _torch_suffix_and_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """('.weight' | '.bias', torch shape) for a Flax leaf of `shape`."""
    leaf = path[-1]
    if leaf in ("gamma", "beta"):
        return (".weight" if leaf == "gamma" else ".bias"), (1, 1, 1, *shape)
    if leaf in ("bias", "scale"):
        return (".bias" if leaf == "bias" else ".weight"), tuple(shape)
    if leaf == "kernel":
        if len(shape) == 4:
            h, w, i, o = shape
            return ".weight", (o, i, h, w)
        return ".weight", tuple(shape[::-1])
    raise ValueError(f"unexpected Flax param {'/'.join(path)!r}.")


def _leaf_to_torch(path: tuple[str, ...], w: np.ndarray) -> tuple[str, np.ndarray]:
    suffix, shape = _torch_suffix_and_shape(path, w.shape)
    if path[-1] == "kernel":
        w = np.transpose(w, (3, 2, 0, 1)) if w.ndim == 4 else w.T
    return suffix, np.ascontiguousarray(w.reshape(shape))


def _expected_shapes(module: nn.Module, example_args) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = jax.eval_shape(lambda: nn.unbox(module.init(jax.random.PRNGKey(0), *example_args)["params"]))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}


def _from_torch(state: Mapping[str, np.ndarray], prefix: str, expected, what: str) -> dict:
    keys = [k for k in state if k.startswith(prefix)]
    if not keys:
        raise ValueError(
            f"{what}: no tensors start with {prefix!r} (the state dict has {len(state)} keys, e.g. "
            f"{list(state)[:3]}). Pass the prefix the checkpoint uses."
        )
    flat = {}
    for key in keys:
        w = np.asarray(state[key])
        *mods, leaf = torch_key_to_path(key[len(prefix):])
        path, arr = _leaf_from_torch(tuple(mods), leaf, w, key)
        flat[path] = arr
    if expected is not None:
        missing = [prefix + _torch_name(p) for p in expected if p not in flat]
        unexpected = [prefix + _torch_name(p) for p in flat if p not in expected]
        if missing or unexpected:
            raise ValueError(
                f"{what}: checkpoint does not match the module: missing {missing[:5]} "
                f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)."
            )
        for p, want in expected.items():
            if flat[p].shape != want:
                key = prefix + _torch_name(p)
                raise ValueError(
                    f"{what}: {key!r} has shape {tuple(np.shape(state[key]))} in the checkpoint but the "
                    f"module expects {_torch_suffix_and_shape(p, want)[1]} (torch layout). Check the "
                    "module's sizes (block_out_channels, hidden_size, ...) against the checkpoint config."
                )
    return traverse_util.unflatten_dict(flat)


def _torch_name(path: tuple[str, ...]) -> str:
    return path_to_torch_key(path[:-1], _LISTS) + _torch_suffix_and_shape(path, (1, 1, 1, 1))[0]


def _to_torch(params: Mapping, prefix: str) -> dict[str, np.ndarray]:
    out = {}
    for path, w in traverse_util.flatten_dict(nn.unbox(dict(params))).items():
        suffix, arr = _leaf_to_torch(path, np.asarray(w))
        out[prefix + path_to_torch_key(path[:-1], _LISTS) + suffix] = arr
    return out


def _torch_shapes(expected, prefix: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for path, shape in expected.items():
        suffix, tshape = _torch_suffix_and_shape(path, shape)
        out[prefix + path_to_torch_key(path[:-1], _LISTS) + suffix] = tshape
    return out


def _encoder_expected(module: ShallowUViTEncoder):
    s = 4 * module.stride
    x = np.zeros((1, s, s, module.input_channels), np.float32)
    return _expected_shapes(module, (x, np.zeros((1,), np.float32)))


def _decoder_expected(module: ShallowUViTDecoder):
    x = np.zeros((1, 2, 2, module.in_channels), np.float32)
    skip = np.zeros((1, 2, 2, module.block_out_channels[-1]), np.float32)
    return _expected_shapes(module, (x, [skip], np.zeros((1, module.hidden_size), np.float32)))


def gen_encoder_torch_shapes(module: ShallowUViTEncoder, prefix: str = ENCODER_PREFIX) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and torch shapes `module` needs (no arrays are built)."""
    return _torch_shapes(_encoder_expected(module), prefix)


def gen_decoder_torch_shapes(module: ShallowUViTDecoder, prefix: str = DECODER_PREFIX) -> dict[str, tuple[int, ...]]:
    """The checkpoint keys and torch shapes `module` needs (no arrays are built)."""
    return _torch_shapes(_decoder_expected(module), prefix)


def gen_encoder_from_torch(
    state: Mapping[str, np.ndarray], prefix: str = ENCODER_PREFIX, module: ShallowUViTEncoder | None = None
) -> dict:
    """`vision_gen_enc_model.*` tensors (numpy, torch layout) -> ShallowUViTEncoder params.

    With `module`, every key and shape is checked against `module.init` (ValueError naming the
    key and both shapes); without it, only the tensors under `prefix` are converted.
    """
    expected = None if module is None else _encoder_expected(module)
    return _from_torch(state, prefix, expected, "gen_encoder_from_torch")


def gen_encoder_to_torch(params: Mapping, prefix: str = ENCODER_PREFIX) -> dict[str, np.ndarray]:
    """ShallowUViTEncoder params -> `{prefix}...` torch-layout numpy tensors (inverse of the above)."""
    return _to_torch(params, prefix)


def gen_decoder_from_torch(
    state: Mapping[str, np.ndarray], prefix: str = DECODER_PREFIX, module: ShallowUViTDecoder | None = None
) -> dict:
    """`vision_gen_dec_model.*` tensors (numpy, torch layout) -> ShallowUViTDecoder params (see encoder)."""
    expected = None if module is None else _decoder_expected(module)
    return _from_torch(state, prefix, expected, "gen_decoder_from_torch")


def gen_decoder_to_torch(params: Mapping, prefix: str = DECODER_PREFIX) -> dict[str, np.ndarray]:
    """ShallowUViTDecoder params -> `{prefix}...` torch-layout numpy tensors."""
    return _to_torch(params, prefix)
