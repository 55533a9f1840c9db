"""JanusFlow ShallowUViT blocks vs hand-written torch references; key conversion round trips.

The torch references below are written from the description of DeepSeek's uvit.py (ConvNeXt
with RMSNorm/GRN/modulation, diffusers timestep embedding, PixelShuffle). Parameters are
random numpy tensors in the torch layout, converted with `janusflow_gen_keys`, so each parity
test also checks the conversion.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

torch = pytest.importorskip("torch")
F = torch.nn.functional

from unimm_jax.convert.janusflow_gen_keys import (  # noqa: E402
    DECODER_PREFIX,
    ENCODER_PREFIX,
    gen_decoder_from_torch,
    gen_decoder_to_torch,
    gen_decoder_torch_shapes,
    gen_encoder_from_torch,
    gen_encoder_to_torch,
    gen_encoder_torch_shapes,
)
from unimm_jax.models import flow  # noqa: E402

TOL = 2e-5


# ------------------------------------------------------------------ torch references (by hand)


def t_rmsnorm(x, w, eps=1e-6):  # x channels-last
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def t_grn(x, w, b):  # x NHWC; w, b (1,1,1,C)
    gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
    nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
    return b + (w * nx + 1) * x


def t_convnext(x, cond, sd, p):  # x NCHW
    c = x.shape[1]
    h = F.conv2d(x, sd[p + "depthwise.weight"], sd[p + "depthwise.bias"], padding=3, groups=c)
    h = h.permute(0, 2, 3, 1)
    h = t_rmsnorm(h, sd[p + "norm.weight"])
    h = F.gelu(F.linear(h, sd[p + "channelwise_linear_1.weight"], sd[p + "channelwise_linear_1.bias"]))
    h = t_grn(h, sd[p + "channelwise_norm.weight"], sd[p + "channelwise_norm.bias"])
    h = F.linear(h, sd[p + "channelwise_linear_2.weight"], sd[p + "channelwise_linear_2.bias"])
    x = x + h.permute(0, 3, 1, 2)
    m = F.linear(F.silu(cond), sd[p + "cond_embeds_mapper.weight"], sd[p + "cond_embeds_mapper.bias"])
    scale, shift = m.chunk(2, dim=1)
    return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


def t_time_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-np.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # flip_sin_to_cos=True


def t_unpatchify(x, sd, p):
    x = t_rmsnorm(x.permute(0, 2, 3, 1), sd[p + "norm.weight"]).permute(0, 3, 1, 2)
    x = F.conv2d(x, sd[p + "unpatch_conv.weight"], sd[p + "unpatch_conv.bias"])
    return F.pixel_shuffle(x, 2)


def t_encoder(x, t, sd, layers, stride=2):
    p = ENCODER_PREFIX
    c = sd[p + "in_conv.weight"].shape[0]
    temb = t_time_embedding(t, c)
    temb = F.linear(temb, sd[p + "time_embed.linear_1.weight"], sd[p + "time_embed.linear_1.bias"])
    temb = F.linear(F.silu(temb), sd[p + "time_embed.linear_2.weight"], sd[p + "time_embed.linear_2.bias"])
    h = F.conv2d(x, sd[p + "in_conv.weight"], sd[p + "in_conv.bias"], stride=stride)
    for i in range(layers):
        h = t_convnext(h, temb, sd, f"{p}mid_block.res_blocks.{i}.")
    return h, temb


def t_decoder(x, skip, temb, sd, layers, upsamples):
    p = DECODER_PREFIX
    x = t_rmsnorm(x.permute(0, 2, 3, 1), sd[p + "input_norm.weight"]).permute(0, 3, 1, 2)
    x = torch.cat([x, skip], dim=1)
    for i in range(layers):
        x = t_convnext(x, temb, sd, f"{p}mid_block.res_blocks.{i}.")
    for k in range(upsamples):
        x = t_unpatchify(x, sd, f"{p}out_convs.{k}.")
    return x


# ------------------------------------------------------------------------------- helpers


def _random_state(shapes, seed):
    """Random torch-layout tensors; norms around 1, everything else (GRN too) non-zero."""
    rng = np.random.default_rng(seed)
    sd = {}
    for k, s in sorted(shapes.items()):
        w = rng.standard_normal(s).astype(np.float32)
        if k.endswith("norm.weight") and "channelwise_norm" not in k:
            w = 1.0 + 0.2 * w
        elif len(s) >= 2 and "channelwise_norm" not in k:
            w *= 1.0 / np.sqrt(np.prod(s[1:]))  # fan-in scaling keeps activations O(1)
        else:
            w *= 0.3
        sd[k] = w
    return sd


def _t(sd):
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def _nhwc(t):
    return jnp.asarray(t.numpy().transpose(0, 2, 3, 1))


def _nchw(a):
    return np.asarray(a).transpose(0, 3, 1, 2)


# ---------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("dim,flip,shift", [(16, True, 0.0), (15, False, 1.0), (768, True, 0.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 33.3, 500.0, 999.0])
    ref = emb_mod.get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    out = flow.timestep_embedding(jnp.asarray(t.numpy()), dim, flip, shift)
    assert out.shape == (5, dim) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4)  # sin/cos of args up to ~1e3
    if flip and dim == 16:
        np.testing.assert_allclose(np.asarray(out), t_time_embedding(t, 16).numpy(), atol=1e-4)


def test_time_embedding_mlp_matches_diffusers():
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    torch.manual_seed(0)
    ref = emb_mod.TimestepEmbedding(16, 24)
    x = torch.randn(3, 16)
    params = {
        name: {"kernel": jnp.asarray(getattr(ref, name).weight.detach().numpy().T),
               "bias": jnp.asarray(getattr(ref, name).bias.detach().numpy())}
        for name in ("linear_1", "linear_2")
    }
    out = flow.TimestepEmbedding(24).apply({"params": params}, jnp.asarray(x.numpy()))
    np.testing.assert_allclose(np.asarray(out), ref(x).detach().numpy(), atol=TOL)


def test_rmsnorm_and_grn():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 6, 8)).astype(np.float32) * 3
    w = (1 + 0.3 * rng.standard_normal(8)).astype(np.float32)
    out = flow.RMSNorm(1e-6).apply({"params": {"scale": w}}, x)
    np.testing.assert_allclose(np.asarray(out), t_rmsnorm(torch.from_numpy(x), torch.from_numpy(w)).numpy(), atol=TOL)

    g, b = rng.standard_normal((2, 8)).astype(np.float32)
    out = flow.GRN().apply({"params": {"gamma": g, "beta": b}}, x)
    ref = t_grn(torch.from_numpy(x), torch.from_numpy(g).view(1, 1, 1, -1), torch.from_numpy(b).view(1, 1, 1, -1))
    np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4, rtol=1e-5)
    # zero-initialised GRN is the identity
    np.testing.assert_array_equal(np.asarray(flow.GRN().apply({"params": {"gamma": 0 * g, "beta": 0 * b}}, x)), x)


def test_pixel_shuffle_matches_torch():
    x = np.arange(2 * 3 * 4 * 12, dtype=np.float32).reshape(2, 12, 3, 4)  # NCHW, C = 3 * 2 * 2
    ref = F.pixel_shuffle(torch.from_numpy(x), 2).numpy()
    out = flow.pixel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), 2)
    assert out.shape == (2, 6, 8, 3)
    np.testing.assert_array_equal(_nchw(out), ref)
    with pytest.raises(ValueError, match="divisible"):
        flow.pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def test_unpatchify_matches_torch():
    rng = np.random.default_rng(1)
    sd = {
        "u.norm.weight": 1 + 0.2 * rng.standard_normal(8),
        "u.unpatch_conv.weight": rng.standard_normal((12, 8, 1, 1)) * 0.3,
        "u.unpatch_conv.bias": rng.standard_normal(12),
    }
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    params = {
        "norm": {"scale": sd["u.norm.weight"]},
        "unpatch_conv": {"kernel": sd["u.unpatch_conv.weight"].transpose(2, 3, 1, 0), "bias": sd["u.unpatch_conv.bias"]},
    }
    x = torch.randn(2, 8, 3, 5, generator=torch.Generator().manual_seed(0))
    out = flow.Unpatchify(3).apply({"params": params}, _nhwc(x))
    assert out.shape == (2, 6, 10, 3)
    np.testing.assert_allclose(_nchw(out), t_unpatchify(x, _t(sd), "u.").numpy(), atol=TOL)


def test_convnext_block_matches_torch():
    c, hidden = 8, 12
    enc = flow.ShallowUViTEncoder(block_out_channels=(c,), hidden_size=hidden, layers_in_middle=1)
    sd = _random_state(gen_encoder_torch_shapes(enc), seed=2)
    block = traverse_util.unflatten_dict(
        {k[2:]: v for k, v in traverse_util.flatten_dict(gen_encoder_from_torch(sd, module=enc)).items()
         if k[:2] == ("mid_block", "res_blocks_0")}
    )
    g = torch.Generator().manual_seed(3)
    x, cond = torch.randn(2, c, 9, 7, generator=g), torch.randn(2, hidden, generator=g)
    out = flow.ConvNextBlock(c).apply({"params": block}, _nhwc(x), jnp.asarray(cond.numpy()))
    ref = t_convnext(x, cond, _t(sd), ENCODER_PREFIX + "mid_block.res_blocks.0.")
    np.testing.assert_allclose(_nchw(out), ref.numpy(), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="has 4 channels"):
        flow.ConvNextBlock(c).apply({"params": block}, jnp.zeros((1, 4, 4, 4)), jnp.zeros((1, hidden)))


def test_encoder_decoder_end_to_end():
    c, hidden, layers = 16, 24, 2
    enc = flow.ShallowUViTEncoder(block_out_channels=(c,), hidden_size=hidden, layers_in_middle=layers)
    dec = flow.ShallowUViTDecoder(in_channels=c, block_out_channels=(c,), hidden_size=hidden,
                                  layers_in_middle=layers, upsamples=2)
    sd = _random_state({**gen_encoder_torch_shapes(enc), **gen_decoder_torch_shapes(dec)}, seed=4)
    pe, pd = gen_encoder_from_torch(sd, module=enc), gen_decoder_from_torch(sd, module=dec)

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 12, 12, generator=g)
    t = torch.tensor([0.0, 633.3])  # JanusFlow feeds t * 1000
    y = torch.randn(2, c, 6, 6, generator=g)
    with torch.no_grad():
        xe_ref, temb_ref = t_encoder(x, t, _t(sd), layers)
        v_ref = t_decoder(y, xe_ref, temb_ref, _t(sd), layers, upsamples=2)

    xe, temb, hs = enc.apply({"params": pe}, _nhwc(x), jnp.asarray(t.numpy()))
    assert xe.shape == (2, 6, 6, c) and temb.shape == (2, hidden) and len(hs) == 1
    np.testing.assert_allclose(np.asarray(temb), temb_ref.numpy(), atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(_nchw(xe), xe_ref.numpy(), atol=1e-4, rtol=1e-4)
    v = dec.apply({"params": pd}, _nhwc(y), hs, temb)
    assert v.shape == (2, 24, 24, 4)  # two unpatchify stages: 6 -> 12 -> 24
    np.testing.assert_allclose(_nchw(v), v_ref.numpy(), atol=1e-4, rtol=1e-4)

    with pytest.raises(ValueError, match="exactly one skip"):
        dec.apply({"params": pd}, _nhwc(y), [], temb)
    with pytest.raises(ValueError, match=r"NHWC latents \[B,H,W,4\]"):
        enc.apply({"params": pe}, jnp.zeros((1, 4, 12, 12)), jnp.zeros((1,)))


# Torch key names and shapes of JanusFlow-1.3B's gen encoder/decoder, as the uvit.py module tree
# builds them (input_channels 4, kernel/stride 2, 768 channels, hidden 2048, 2 ConvNeXt blocks).
def _block(prefix, c):
    return {
        prefix + "depthwise.weight": (c, 1, 7, 7), prefix + "depthwise.bias": (c,),
        prefix + "norm.weight": (c,),
        prefix + "channelwise_linear_1.weight": (4 * c, c), prefix + "channelwise_linear_1.bias": (4 * c,),
        prefix + "channelwise_norm.weight": (1, 1, 1, 4 * c), prefix + "channelwise_norm.bias": (1, 1, 1, 4 * c),
        prefix + "channelwise_linear_2.weight": (c, 4 * c), prefix + "channelwise_linear_2.bias": (c,),
        prefix + "cond_embeds_mapper.weight": (2 * c, 2048), prefix + "cond_embeds_mapper.bias": (2 * c,),
    }


JANUSFLOW_ENC = {
    "time_embed.linear_1.weight": (2048, 768), "time_embed.linear_1.bias": (2048,),
    "time_embed.linear_2.weight": (2048, 2048), "time_embed.linear_2.bias": (2048,),
    "in_conv.weight": (768, 4, 2, 2), "in_conv.bias": (768,),
    **_block("mid_block.res_blocks.0.", 768), **_block("mid_block.res_blocks.1.", 768),
}
JANUSFLOW_DEC = {
    "input_norm.weight": (768,),
    **_block("mid_block.res_blocks.0.", 1536), **_block("mid_block.res_blocks.1.", 1536),
    "out_convs.0.norm.weight": (1536,), "out_convs.0.unpatch_conv.weight": (16, 1536, 1, 1),
    "out_convs.0.unpatch_conv.bias": (16,),
}


def test_default_sizes_give_janusflow_checkpoint_layout():
    enc, dec = flow.ShallowUViTEncoder(), flow.ShallowUViTDecoder()
    assert gen_encoder_torch_shapes(enc) == {ENCODER_PREFIX + k: v for k, v in JANUSFLOW_ENC.items()}
    assert gen_decoder_torch_shapes(dec) == {DECODER_PREFIX + k: v for k, v in JANUSFLOW_DEC.items()}
    # activations: 48x48x4 latents -> 24x24x768 tokens -> 48x48x4 velocity
    def run():
        key = jax.random.PRNGKey(0)
        (xe, temb, hs), _ = enc.init_with_output(key, jnp.zeros((1, 48, 48, 4)), jnp.zeros((1,)))
        v, _ = dec.init_with_output(key, jnp.zeros((1, 24, 24, 768)), hs, temb)
        return xe, temb, v

    xe, temb, v = jax.eval_shape(run)
    assert xe.shape == (1, 24, 24, 768) and temb.shape == (1, 2048)
    assert v.shape == (1, 48, 48, 4)


def test_params_carry_logical_axes():
    from flax import linen as nn

    boxed = jax.eval_shape(lambda: flow.ShallowUViTEncoder(block_out_channels=(8,), hidden_size=12).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 4)), jnp.zeros((1,)))["params"])
    flat = traverse_util.flatten_dict(boxed)
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == len(leaf.value.shape), path
    assert flat[("in_conv", "kernel")].names == ("conv_height", "conv_width", "conv_in", "conv_out")
    assert flat[("mid_block", "res_blocks_0", "norm", "scale")].names == ("norm",)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_conversion_round_trip_is_bit_exact(dtype):
    enc = flow.ShallowUViTEncoder(block_out_channels=(8,), hidden_size=12)
    dec = flow.ShallowUViTDecoder(in_channels=8, block_out_channels=(8,), hidden_size=12, upsamples=2)
    shapes = {**gen_encoder_torch_shapes(enc), **gen_decoder_torch_shapes(dec)}
    sd = {k: v.astype(dtype) for k, v in _random_state(shapes, 6).items()}
    sd["language_model.model.embed_tokens.weight"] = np.zeros((3, 2), dtype)  # other weights are ignored
    pe, pd = gen_encoder_from_torch(sd, module=enc), gen_decoder_from_torch(sd, module=dec)
    back = {**gen_encoder_to_torch(pe), **gen_decoder_to_torch(pd)}
    assert set(back) == set(sd) - {"language_model.model.embed_tokens.weight"}
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape and v.tobytes() == sd[k].tobytes(), k
    # Flax -> torch -> Flax
    again = traverse_util.flatten_dict(gen_encoder_from_torch(gen_encoder_to_torch(pe)))
    flat = traverse_util.flatten_dict(pe)
    assert set(again) == set(flat) and all(again[k].tobytes() == flat[k].tobytes() for k in flat)
    # a custom prefix works both ways
    renamed = gen_decoder_to_torch(pd, prefix="gen_dec.")
    assert all(k.startswith("gen_dec.") for k in renamed)
    redo = traverse_util.flatten_dict(gen_decoder_from_torch(renamed, prefix="gen_dec."))
    assert all(redo[k].tobytes() == v.tobytes() for k, v in traverse_util.flatten_dict(pd).items())


def test_conversion_errors():
    enc = flow.ShallowUViTEncoder(block_out_channels=(8,), hidden_size=12)
    sd = _random_state(gen_encoder_torch_shapes(enc), 7)
    with pytest.raises(ValueError, match="no tensors start with 'vision_gen_enc_model.'"):
        gen_encoder_from_torch({k.replace("vision_gen_enc_model.", "x."): v for k, v in sd.items()})
    bad = dict(sd)
    del bad[ENCODER_PREFIX + "mid_block.res_blocks.1.cond_embeds_mapper.bias"]
    with pytest.raises(ValueError, match=r"missing \['vision_gen_enc_model\.mid_block\.res_blocks\.1\.cond_embeds_mapper\.bias"):
        gen_encoder_from_torch(bad, module=enc)
    bad = dict(sd)
    bad[ENCODER_PREFIX + "in_conv.weight"] = np.zeros((8, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"in_conv\.weight.*\(8, 4, 3, 3\).*\(8, 4, 2, 2\)"):
        gen_encoder_from_torch(bad, module=enc)
    bad = dict(sd)
    bad[ENCODER_PREFIX + "mid_block.res_blocks.0.channelwise_norm.weight"] = np.zeros((32,), np.float32)
    with pytest.raises(ValueError, match=r"GRN parameter must have shape \(1,1,1,C\)"):
        gen_encoder_from_torch(bad)
