"""KL autoencoder vs a tiny random diffusers AutoencoderKL; conversion round trips; errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from unimm_jax.convert import diffusers_vae  # noqa: E402
from unimm_jax.models.vae import VAEConfig, init_vae, load_vae, save_vae  # noqa: E402

TOL = 2e-4


def _tiny_torch_vae():
    torch.manual_seed(0)
    m = diffusers.AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.13025,
    )
    with torch.no_grad():
        # Default init leaves norms at (1, 0) and some biases at 0: perturb every 1-D tensor so a
        # swapped scale/bias or a dropped bias shows up.
        for _, p in m.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m.eval()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinyvae")
    m = _tiny_torch_vae()
    m.save_pretrained(d)
    import unimm_jax

    assert unimm_jax.load_vae is load_vae  # the public entry point
    return m, str(d), load_vae(d)


def _nhwc(t):
    return jnp.asarray(t.detach().numpy().transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


def test_config_and_scaling(tiny):
    _, _, vae = tiny
    assert vae.config.block_out_channels == (32, 64)
    assert vae.config.layers_per_block == 1
    assert vae.scaling_factor == pytest.approx(0.13025)
    z = jnp.linspace(-2, 2, 16).reshape(1, 2, 2, 4)
    np.testing.assert_allclose(vae.to_model_latents(z), z * 0.13025, rtol=1e-6)
    np.testing.assert_allclose(vae.from_model_latents(vae.to_model_latents(z)), z, rtol=1e-6, atol=1e-6)


def test_encode_matches_diffusers(tiny):
    m, _, vae = tiny
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = m.encode(x).latent_dist
    mean, logvar = vae.encode_moments(_nhwc(x))
    assert mean.shape == (2, 16, 16, 4) and mean.dtype == jnp.float32
    err = np.abs(_nchw(mean) - dist.mean.numpy()).max()
    assert err < TOL, err
    np.testing.assert_allclose(_nchw(logvar), dist.logvar.numpy(), atol=TOL)
    np.testing.assert_array_equal(np.asarray(vae.encode(_nhwc(x))), np.asarray(mean))


def test_decode_matches_diffusers(tiny):
    m, _, vae = tiny
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m.decode(z).sample.numpy()
    out = vae.decode(_nhwc(z))
    assert out.shape == (2, 32, 32, 3) and out.dtype == jnp.float32
    err = np.abs(_nchw(out) - ref).max()
    assert err < TOL, err


def test_state_dict_round_trip_is_bit_exact(tiny):
    m, _, vae = tiny
    sd = {k: v.numpy() for k, v in m.state_dict().items()}
    params = diffusers_vae.vae_from_torch(sd, vae.config)
    back = diffusers_vae.vae_to_torch(params)
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and np.array_equal(back[k], sd[k]), k
    # and the other way: Flax -> torch -> Flax
    again = diffusers_vae.vae_from_torch(back, vae.config)
    flat_a, flat_b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(again)
    assert set(flat_a) == set(flat_b)
    assert all(np.array_equal(flat_a[k], flat_b[k]) for k in flat_a)
    # the loader produced exactly these params (float32 source, float32 params)
    loaded = traverse_util.flatten_dict(jax.tree.map(np.asarray, vae.params))
    assert all(np.array_equal(loaded[k], flat_a[k]) for k in flat_a)


def test_save_vae_is_read_by_diffusers(tiny, tmp_path):
    m, _, vae = tiny
    save_vae(vae, tmp_path)
    m2 = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    for (k, a), (k2, b) in zip(sorted(m.state_dict().items()), sorted(m2.state_dict().items())):
        assert k == k2 and torch.equal(a, b), k
    assert m2.config.scaling_factor == pytest.approx(0.13025)


def test_legacy_attention_names_load(tiny, tmp_path):
    m, src, vae = tiny
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    legacy = {}
    for k, v in sd.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".{new}.", f".{old}.")
        legacy[k] = v
    assert any(".proj_attn." in k for k in legacy)
    save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "config.json")
    old = load_vae(tmp_path)
    for a, b in zip(jax.tree.leaves(old.params), jax.tree.leaves(vae.params)):
        np.testing.assert_array_equal(a, b)


def test_init_params_carry_logical_axes():
    cfg = VAEConfig(block_out_channels=(32, 64), layers_per_block=1)
    # eval_shape: traces init (names, shapes) without compiling the random initialisers.
    boxed = jax.eval_shape(lambda: init_vae(cfg, jax.random.PRNGKey(0), image_size=8))
    flat = traverse_util.flatten_dict(boxed)
    assert flat
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, path
        if path[-1] == "kernel" and leaf.value.ndim == 4:
            assert leaf.names == ("conv_height", "conv_width", "conv_in", "conv_out")
        if path[-1] == "scale":
            assert leaf.names == ("norm",)
    # the init tree maps onto diffusers' key set and shapes one-to-one
    want = diffusers_vae.expected_torch_shapes(cfg)
    ref = _tiny_torch_vae().state_dict()
    assert want == {k: tuple(v.shape) for k, v in ref.items()}


# --------------------------------------------------------------------------------- errors


def _copy(src, dst):
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))


def test_missing_tensor_is_named(tiny, tmp_path):
    _, src, _ = tiny
    _copy(src, tmp_path)
    f = str(tmp_path / "diffusion_pytorch_model.safetensors")
    sd = load_file(f)
    del sd["decoder.conv_out.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"missing.*decoder\.conv_out\.weight"):
        load_vae(tmp_path)


def test_shape_mismatch_names_key_and_shapes(tiny, tmp_path):
    _, src, _ = tiny
    _copy(src, tmp_path)
    f = str(tmp_path / "diffusion_pytorch_model.safetensors")
    sd = load_file(f)
    sd["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight.*\(32, 3, 5, 5\).*\(32, 3, 3, 3\)"):
        load_vae(tmp_path)


def test_config_that_does_not_match_weights(tiny, tmp_path):
    _, src, _ = tiny
    _copy(src, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["layers_per_block"] = 2
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"missing.*resnets\.2"):
        load_vae(tmp_path)


def test_not_a_vae_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_vae(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match="not 'AutoencoderKL'"):
        load_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", "block_out_channels": [32]}))
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_vae(tmp_path)


def test_bad_inputs(tiny):
    _, _, vae = tiny
    with pytest.raises(ValueError, match=r"NHWC \[B,H,W,3\]"):
        vae.encode(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(jnp.zeros((1, 31, 32, 3)))
    with pytest.raises(ValueError, match=r"\[B,H,W,4\]"):
        vae.decode(jnp.zeros((1, 4, 16, 16)))
    with pytest.raises(ValueError, match="divisible by norm_num_groups"):
        VAEConfig(block_out_channels=(48,), norm_num_groups=32)
