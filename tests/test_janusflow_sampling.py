"""JanusFlow generation: our jitted, prefix-cached sampler vs a hand-written torch reference of
DeepSeek's demo loop (transformers Llama + the uvit blocks of test_flow_blocks), vs the same
sampler without the cache, batching/padding invariance, VAE decoding and input errors."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

import jax.numpy as jnp  # noqa: E402

import unimm_jax as uj  # noqa: E402
from deepseek_janusflow import TINY, TOKENS, write_deepseek_janusflow  # noqa: E402
from test_flow_blocks import t_decoder, t_encoder, t_rmsnorm  # noqa: E402
from unimm_jax.flow_api import JanusFlowModel  # noqa: E402

STEPS = 4
PROMPT = [TOKENS["bos_token_id"], 11, 12, 13, 14, 15, TOKENS["boi_token_id"]]


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("janusflow_ds"))
    sd = write_deepseek_janusflow(path, seed=3)
    return path, sd, uj.load_pretrained(path)


def torch_reference_sample(sd, ids, z0_nhwc, steps, w):
    """DeepSeek's demo `generate` (app_janusflow.py), written out in torch, float32, eager attention.

    ids [B, L] ending in <begin_of_image>; z0 [B, h, w, C]. The prompt is re-run at every step
    (the demo's intended prefix cache is an empty list). Returns z at t=1, NHWC numpy.
    """
    s = TINY
    cfg = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]}, max_position_embeddings=512,
        attn_implementation="eager",
    )
    llama = transformers.LlamaModel(cfg).eval()
    pre = "language_model.model."
    llama.load_state_dict({k[len(pre):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith(pre)})
    t = {k: torch.from_numpy(v) for k, v in sd.items()}
    b = ids.shape[0]
    with torch.no_grad():
        tokens = torch.from_numpy(np.concatenate([ids, ids])).long()
        tokens[b:, 1:] = TOKENS["pad_token_id"]
        emb = llama.embed_tokens(tokens)[:, :-1]
        p = emb.shape[1]
        z = torch.from_numpy(np.asarray(z0_nhwc).transpose(0, 3, 1, 2).copy())
        g = z.shape[-1] // 2
        n = g * g
        mask = torch.ones((2 * b, p + 1 + n), dtype=torch.long)
        mask[b:, 1:p] = 0
        for step in range(steps):
            z_in = torch.cat([z, z])
            tt = torch.full((2 * b,), step / steps * 1000.0)
            h, temb = t_encoder(z_in, tt, t, layers=s["mid"])
            z_emb = h.reshape(2 * b, h.shape[1], -1).permute(0, 2, 1)
            z_emb = F.linear(z_emb, t["vision_gen_enc_aligner.weight"], t["vision_gen_enc_aligner.bias"])
            llm_in = torch.cat([emb, temb[:, None], z_emb], dim=1)
            hid = llama(inputs_embeds=llm_in, attention_mask=mask).last_hidden_state[:, -n:]
            x = F.linear(t_rmsnorm(hid, t["vision_gen_dec_aligner_norm.weight"]),
                         t["vision_gen_dec_aligner.weight"], t["vision_gen_dec_aligner.bias"])
            x = x.reshape(2 * b, g, g, -1).permute(0, 3, 1, 2)
            v = t_decoder(x, h, temb, t, layers=s["mid"], upsamples=1)
            v_c, v_u = v.chunk(2)
            z = z + (1.0 / steps) * (w * v_c - (w - 1.0) * v_u)
    return z.numpy().transpose(0, 2, 3, 1)


def test_load_pretrained_returns_janusflow_model(ds):
    path, _, m = ds
    assert isinstance(m, JanusFlowModel)
    assert m.config.family == "janusflow" and m.vae is None


def test_cached_sampler_matches_torch_reference(ds):
    _, sd, m = ds
    ids = np.array([PROMPT])
    z0 = np.asarray(m.flow_noise(2, seed=5))
    ours = np.asarray(m.generate_latents_flow(ids, num_images=2, steps=STEPS, cfg_weight=2.5, seed=5))
    ref = torch_reference_sample(sd, np.repeat(ids, 2, axis=0), z0, STEPS, 2.5)
    assert np.abs(ref - np.asarray(z0)).max() > 0.1  # the sampler moved the latents
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)


def test_prefix_cache_equals_no_cache_with_left_padding(ds):
    _, _, m = ds
    pad = TOKENS["pad_token_id"]
    ids = np.array([[pad, pad] + PROMPT[:1] + PROMPT[3:], PROMPT])  # 5 real tokens, left padded; 7 tokens
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    kw = dict(num_images=2, steps=STEPS, cfg_weight=3.0, seed=1, attention_mask=mask)
    cached = np.asarray(m.generate_latents_flow(ids, **kw))
    full = np.asarray(m.generate_latents_flow(ids, use_cache=False, **kw))
    assert cached.shape == (4, 4, 4, 4)
    np.testing.assert_allclose(cached, full, atol=1e-5, rtol=0)


def test_left_padded_prompt_equals_prompt_alone(ds):
    """Padding must be invisible: row 0 of a padded batch == the prompt sampled on its own (same noise)."""
    _, _, m = ds
    short = PROMPT[:1] + PROMPT[3:]
    pad = TOKENS["pad_token_id"]
    batch = np.array([[pad, pad] + short, PROMPT])
    mask = np.array([[0, 0] + [1] * len(short), [1] * len(PROMPT)])
    both = np.asarray(m.generate_latents_flow(batch, steps=2, seed=9, attention_mask=mask))
    alone = m._sample(m.params, jnp.asarray([short], jnp.int32), jnp.ones((1, len(short)), jnp.int32),
                      m.flow_noise(2, 9)[:1], jnp.float32(2.0), steps=2, num_images=1, use_cache=True)
    np.testing.assert_allclose(both[:1], np.asarray(alone), atol=1e-5)


def test_cfg_weight_one_ignores_the_unconditional_branch(ds):
    """w=1 gives v_cond alone, so a different unconditional prompt layout cannot matter; w!=1 does."""
    _, _, m = ds
    a = np.asarray(m.generate_latents_flow(np.array([PROMPT]), steps=2, cfg_weight=1.0, seed=2))
    b = np.asarray(m.generate_latents_flow(np.array([PROMPT]), steps=2, cfg_weight=4.0, seed=2))
    assert np.abs(a - b).max() > 1e-3


def test_generate_images_needs_a_vae_then_decodes(ds, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    path, _, m = ds
    with pytest.raises(ValueError, match="SDXL VAE.*load_pretrained\\(path, vae="):
        m.generate_images_flow(np.array([PROMPT]), steps=2)
    torch.manual_seed(0)
    vae_t = diffusers.AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                                    up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                                    norm_num_groups=32, sample_size=32, scaling_factor=0.13025)
    vae_dir = tmp_path / "vae"
    vae_t.save_pretrained(vae_dir)
    m2 = uj.load_pretrained(path, vae=str(vae_dir))
    imgs = np.asarray(m2.generate_images_flow(np.array([PROMPT]), num_images=2, steps=2, seed=4))
    assert imgs.shape == (2, 32, 32, 3) and imgs.dtype == np.float32
    assert imgs.min() >= -1.0 and imgs.max() <= 1.0
    lat = m2.generate_latents_flow(np.array([PROMPT]), num_images=2, steps=2, seed=4)
    want = np.clip(np.asarray(m2.vae.decode(lat / 0.13025)), -1, 1)
    np.testing.assert_allclose(imgs, want, atol=1e-5)


def test_bad_prompts_are_named(ds):
    _, _, m = ds
    with pytest.raises(ValueError, match="must end with <begin_of_image>"):
        m.generate_latents_flow(np.array([PROMPT[:-1]]), steps=1)
    with pytest.raises(ValueError, match="left padding"):
        m.generate_latents_flow(np.array([PROMPT]), steps=1, attention_mask=np.array([[1] * 6 + [0]]))
    with pytest.raises(ValueError, match="outside"):
        m.generate_latents_flow(np.array([[1, 9999, TOKENS["boi_token_id"]]]), steps=1)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        m.generate_latents_flow(np.array([PROMPT]), steps=0)


def test_vae_subdirectory_is_picked_up(ds, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    import shutil

    path, _, _ = ds
    ckpt = tmp_path / "with_vae"
    shutil.copytree(path, ckpt)
    torch.manual_seed(1)
    diffusers.AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4,
                            norm_num_groups=32, sample_size=32).save_pretrained(ckpt / "vae")
    m = uj.load_pretrained(str(ckpt))
    assert m.vae is not None and m.vae.config.latent_channels == 4
    # conversions carry the VAE along
    uj.save_pretrained(m, str(tmp_path / "out"), format="deepseek")
    assert (tmp_path / "out" / "vae" / "config.json").exists()


def test_sharded_sampling_equals_one_device(ds):
    import jax

    from unimm_jax.sharding import make_mesh

    path, _, m = ds
    sharded = uj.load_pretrained(path, mesh=make_mesh(data=2, fsdp=2, tensor=2))
    q = sharded.params["llm"]["layers"]["attn"]["q"]["kernel"]
    assert len(q.addressable_shards) == 8 and q.sharding.spec != jax.sharding.PartitionSpec()
    kw = dict(num_images=2, steps=2, cfg_weight=2.0, seed=3)
    np.testing.assert_allclose(np.asarray(sharded.generate_latents_flow(np.array([PROMPT]), **kw)),
                               np.asarray(m.generate_latents_flow(np.array([PROMPT]), **kw)), atol=1e-5)
