"""The unimm checkpoint layout: unimm_config.json + params/ (orbax) + extras.safetensors."""
from __future__ import annotations

import json
import os

import ml_collections
import numpy as np

from unimm_jax.convert.safetensors_io import CheckpointError, SafetensorsReader, iter_plan_from_arrays, write_sharded

UNIMM_CONFIG = "unimm_config.json"
FORMAT_VERSION = 1


def write_unimm(directory: str, model_cfg, params: dict, extras: dict, extras_format: str | None, dtype=None):
    import orbax.checkpoint as ocp

    if dtype is not None:
        params = {k: _cast(v, dtype) for k, v in params.items()}
    ocp.PyTreeCheckpointer().save(os.path.join(os.path.abspath(directory), "params"), params)
    if extras:
        write_sharded(directory, iter_plan_from_arrays(extras), stem="extras",
                      metadata={"source_format": extras_format or ""})
    with open(os.path.join(directory, UNIMM_CONFIG), "w") as f:
        json.dump({"format_version": FORMAT_VERSION, "model": model_cfg.to_dict()}, f, indent=2, default=list)


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return np.asarray(tree).astype(dtype)


def read_unimm_config(directory: str) -> ml_collections.ConfigDict:
    from unimm_jax.convert.janus_config_io import read_json
    from unimm_jax.models.janus_config import validate_janus_config

    raw = read_json(os.path.join(directory, UNIMM_CONFIG))
    if raw.get("format_version") != FORMAT_VERSION or "model" not in raw:
        raise CheckpointError(f"{directory}/{UNIMM_CONFIG}: unsupported unimm format version {raw.get('format_version')!r}.")
    model = raw["model"]
    for sub in ("vq",):
        if sub in model and "channel_multiplier" in model[sub]:
            model[sub]["channel_multiplier"] = tuple(model[sub]["channel_multiplier"])
    cfg = ml_collections.ConfigDict(model)
    if cfg.get("family", "janus") == "janus":
        validate_janus_config(cfg)
    return cfg


def read_unimm(directory: str, dtype=None):
    import orbax.checkpoint as ocp

    from unimm_jax.convert.checkpoints import Checkpoint

    cfg = read_unimm_config(directory)
    pdir = os.path.join(os.path.abspath(directory), "params")
    if not os.path.isdir(pdir):
        raise CheckpointError(f"{directory}: params/ is missing; the unimm checkpoint is incomplete.")
    params = ocp.PyTreeCheckpointer().restore(pdir)
    if dtype is not None:
        params = _cast(params, dtype)
    extras, fmt = {}, None
    if os.path.exists(os.path.join(directory, "extras.safetensors")) or os.path.exists(
        os.path.join(directory, "extras.safetensors.index.json")
    ):
        r = SafetensorsReader.from_dir(directory, "extras")
        extras = {k: r.read(k) for k in r.keys()}
        fmt = r.metadata.get("source_format") or None
    return Checkpoint(cfg, params, extras, fmt, directory)
