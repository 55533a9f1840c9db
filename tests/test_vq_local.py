"""The VQ's local encoder (model.vq.encoder_context="local"): per-pixel GroupNorm by hand, codes
that do not depend on far-away pixels (the global encoder's do), config errors, and the formats
that can and cannot store such a VQ."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import unimm_jax as uj
from test_train_step import _params, tiny_model
from unimm_jax.api import JanusModel
from unimm_jax.convert.safetensors_io import CheckpointError
from unimm_jax.layers.norms import GroupNorm
from unimm_jax.models.vq import VQModel
from unimm_jax.train import vq_trainer


def test_per_position_group_norm_by_hand():
    x = np.random.default_rng(0).normal(size=(2, 3, 5, 8)).astype(np.float32) * 3 + 1
    norm = GroupNorm(2, per_position=True)
    params = norm.init(jax.random.key(0), x)
    params = jax.tree.map(lambda p: p + 0.5, params)  # non-trivial scale 1.5 and bias 0.5
    got = np.asarray(norm.apply(params, x))
    g = x.reshape(2, 3, 5, 2, 4)  # each pixel's channels in 2 groups of 4
    want = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want.reshape(x.shape) * 1.5 + 0.5, rtol=1e-5, atol=1e-5)
    # The global form differs on the same input (statistics over H and W too).
    assert not np.allclose(np.asarray(GroupNorm(2).apply(params, x)), got, atol=1e-3)


def _vq(context: str, image_size: int = 128) -> ml_collections.ConfigDict:
    vq = ml_collections.ConfigDict(tiny_model().vq.to_dict())
    vq.image_size, vq.encoder_context = image_size, context
    vq.base_channels, vq.norm_groups, vq.latent_channels = 8, 4, 8
    vq.channel_multiplier, vq.num_res_blocks = (1, 1, 2, 4), 0  # the shapes world's 8x VQ
    return vq


def _latents(vq, images, seed=0):
    model = VQModel(vq)
    params = model.init(jax.random.key(seed), jnp.asarray(images[:1]))["params"]
    # The pre-quantisation latents: codes are their nearest codebook rows.
    return np.asarray(model.apply({"params": params}, jnp.asarray(images), method=lambda m, x: m.quant_conv(m.encoder(x))))


@pytest.mark.parametrize("context", ["local", "global"])
def test_local_encoder_codes_ignore_far_away_pixels(context):
    """128 px -> a 16 x 16 latent grid. Paint an object into the top-left corner: a local
    encoder's latents at the bottom-right quarter (beyond its convolutions' reach of 5 latent
    cells) stay the same up to float rounding; the global encoder's (attention, image-wide
    GroupNorm) move."""
    white = np.ones((1, 128, 128, 3), np.float32)
    painted = white.copy()
    painted[0, 4:20, 4:20] = np.array([0.8, -0.8, -0.4], np.float32)
    z = _latents(_vq(context), np.concatenate([white, painted]))
    assert z.shape[:3] == (2, 16, 16)
    far = np.abs(z[0, 8:, 8:] - z[1, 8:, 8:]).max()
    near = np.abs(z[0, :3, :3] - z[1, :3, :3]).max()
    assert near > 1e-3  # the object itself is seen by both encoders
    if context == "local":
        # Not bit-identical: XLA:CPU's kernels may round the batch's two rows differently
        # (4e-7 on an AVX2-only host); a dependence on the object would be > 1e-4, as for global.
        assert far < 1e-5
    else:
        assert far > 1e-4


def test_local_encoder_has_no_attention_and_bad_context_is_named():
    images = np.ones((1, 64, 64, 3), np.float32)
    model = VQModel(_vq("local", 64))
    params = model.init(jax.random.key(0), jnp.asarray(images))["params"]
    assert "attn_1" not in params["encoder"]["mid"]
    assert "attn_1" in params["decoder"]["mid"]  # only the encoder is made local
    with pytest.raises(ValueError, match=r"model.vq.encoder_context='nearby' must be one of \('global', 'local'\)"):
        _latents(_vq("nearby", 64), images)


def test_vqs_the_reference_cannot_build_save_as_unimm_only(tmp_path):
    m = tiny_model()
    m.vq.encoder_context = "local"
    model = JanusModel(m, _params(m))
    images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    uj.save_pretrained(model, str(tmp_path / "unimm"), format="unimm")
    loaded = uj.load_pretrained(str(tmp_path / "unimm"))
    assert loaded.config.vq.encoder_context == "local"
    np.testing.assert_array_equal(np.asarray(loaded.vq_encode(images)), np.asarray(model.vq_encode(images)))
    for fmt, name in (("hf", "transformers"), ("deepseek", "DeepSeek")):
        with pytest.raises(CheckpointError, match=f"the {name} VQ has no such encoder.*format='unimm'"):
            uj.save_pretrained(model, str(tmp_path / fmt), format=fmt)
        assert not (tmp_path / fmt).exists()
    m.vq.encoder_context, m.vq.num_res_blocks = "global", 0  # the shapes world's VQ has no res blocks
    model = JanusModel(m, _params(m))
    for fmt, name in (("hf", "transformers"), ("deepseek", "DeepSeek")):
        with pytest.raises(CheckpointError, match=f"num_res_blocks=0: the {name} VQ needs at least one res block"):
            uj.save_pretrained(model, str(tmp_path / fmt), format=fmt)


def test_tokenizer_trained_before_the_option_loads_as_global(tmp_path):
    import json

    vq = _vq("global", 64)
    params = VQModel(vq).init(jax.random.key(0), jnp.ones((1, 64, 64, 3)))["params"]
    out = tmp_path / "tok"
    vq_trainer.save_params(str(out / vq_trainer.PARAMS_DIR), jax.device_get(params))
    old = {k: v for k, v in vq.to_dict().items() if k != "encoder_context"}
    with open(out / vq_trainer.CONFIG_FILE, "w") as f:
        json.dump(old, f, default=list)
    cfg, _ = vq_trainer.load_vq(out)
    assert cfg.encoder_context == "global"
    vq_trainer.check_vq_matches(vq, cfg)  # no spurious mismatch for an older tokenizer dir
    with pytest.raises(ValueError, match=r"differs from the trained tokenizer's config in \['encoder_context'\]"):
        vq_trainer.check_vq_matches(_vq("local", 64), cfg)
