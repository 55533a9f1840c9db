"""JanusFlow model: understanding path and intermediate LLM layer vs transformers' Llama, the
flow + REPA training loss decomposed by hand, a few optimizer steps, pixel-space latents,
config validation and batch checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

import unimm_jax as uj  # noqa: E402
from deepseek_janusflow import TINY, TOKENS, write_deepseek_janusflow  # noqa: E402
from unimm_jax.losses import flow_interpolate, rectified_flow_loss, sample_flow_timesteps  # noqa: E402
from unimm_jax.models.janusflow import (  # noqa: E402
    JanusFlow,
    check_flow_batch,
    flow_training_loss,
    images_to_latents,
    latents_to_images,
    prompt_layout,
)
from unimm_jax.models.janusflow_config import tiny_janusflow_config, validate_janusflow_config  # noqa: E402
from unimm_jax.train.flow_step import flow_train_step, synthetic_flow_batch  # noqa: E402
from unimm_jax.train.state import TrainState  # noqa: E402

N_UND = (TINY["image"] // TINY["patch"]) ** 2


def _hf_llama(sd, causal_lm=False):
    s = TINY
    cfg = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["d"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": s["rope_theta"]}, max_position_embeddings=512,
        attn_implementation="eager", tie_word_embeddings=False,
    )
    if causal_lm:
        m = transformers.LlamaForCausalLM(cfg).eval()
        state = {k[len("language_model."):]: torch.from_numpy(v) for k, v in sd.items() if k.startswith("language_model.")}
    else:
        m = transformers.LlamaModel(cfg).eval()
        state = {k[len("language_model.model."):]: torch.from_numpy(v) for k, v in sd.items()
                 if k.startswith("language_model.model.")}
    m.load_state_dict(state)
    return m


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("jf_model"))
    sd = write_deepseek_janusflow(path, seed=7)
    return sd, uj.load_pretrained(path)


def test_understanding_logits_match_reference_embedding_layout(ds):
    """prepare_inputs_embeds: <begin_of_image> takes beg_of_und_embed, the placeholders take
    vision_und_enc_aligner(SigLIP(image)); then Llama + lm_head (transformers)."""
    sd, m = ds
    t = TOKENS
    ids = np.array([[t["bos_token_id"], 20, 21, t["boi_token_id"]] + [t["image_token_id"]] * N_UND
                    + [t["eoi_token_id"], 22, 23]])
    px = np.random.default_rng(0).uniform(-1, 1, (1, TINY["image"], TINY["image"], 3)).astype(np.float32)
    ours = np.asarray(m.understanding_logits(ids, px))
    feats = np.array(m.module.apply({"params": m.params}, jnp.asarray(px), method=lambda mod, x: mod.vision(x)))
    llama = _hf_llama(sd, causal_lm=True)
    with torch.no_grad():
        emb = llama.model.embed_tokens(torch.from_numpy(ids)).clone()
        img = F.linear(torch.from_numpy(feats), torch.from_numpy(sd["vision_und_enc_aligner.weight"]),
                       torch.from_numpy(sd["vision_und_enc_aligner.bias"]))
        img = torch.cat([torch.from_numpy(sd["beg_of_und_embed"])[None], img], dim=1)
        emb[0, 3:4 + N_UND] = img[0]
        ref = llama(inputs_embeds=emb).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="<begin_of_image> tokens"):
        m.understanding_logits(np.delete(ids, 3, axis=1), px)


def test_split_llm_run_gives_the_intermediate_layer(ds):
    """run_llm_split(k): (final hidden, hidden after k layers) == transformers' hidden_states[k]."""
    sd, m = ds
    emb = np.random.default_rng(1).standard_normal((2, 9, TINY["d"])).astype(np.float32)
    seg = np.ones((2, 9), np.int32)
    seg[1, :2] = 0  # left padding
    pos = np.maximum(np.cumsum(seg, 1) - 1, 0).astype(np.int32)
    fin, mid = m.module.apply({"params": m.params}, jnp.asarray(emb), jnp.asarray(seg), jnp.asarray(pos), 2,
                              method=JanusFlow.run_llm_split)
    full = m.module.apply({"params": m.params}, jnp.asarray(emb), jnp.asarray(seg), jnp.asarray(pos),
                          method=JanusFlow.run_llm)
    np.testing.assert_allclose(np.asarray(fin), np.asarray(full), atol=1e-5)
    with torch.no_grad():
        out = _hf_llama(sd)(inputs_embeds=torch.from_numpy(emb), attention_mask=torch.from_numpy(seg).long(),
                            position_ids=torch.from_numpy(pos).long(), output_hidden_states=True)
    real = seg.astype(bool)
    np.testing.assert_allclose(np.asarray(mid)[real], out.hidden_states[2].numpy()[real], atol=1e-4)
    np.testing.assert_allclose(np.asarray(fin)[real], out.last_hidden_state.numpy()[real], atol=1e-4)


@pytest.fixture(scope="module")
def tiny(ds):
    """The DeepSeek-layout model's params plus a freshly initialised REPA head on LLM layer 1
    (a whole-model init would cost a long compile on a small CPU)."""
    from unimm_jax.models.janusflow import RepaHead

    _, m = ds
    cfg = m.config.copy_and_resolve_references()
    cfg.flow.cond_drop_rate = 0.0
    cfg.repa.update(dict(enabled=True, layer=1, hidden=48))
    validate_janusflow_config(cfg)
    head = RepaHead(48, cfg.vision.hidden_size).init(jax.random.key(0), jnp.zeros((1, cfg.llm.hidden_size)))
    params = dict(m.params, repa_head=jax.tree.map(jnp.asarray, nn.unbox(head["params"])))
    batch = {k: jnp.asarray(v) for k, v in synthetic_flow_batch(cfg, 2, 5, seed=0, index=0).items()}
    return cfg, params, batch


def test_flow_loss_is_rf_plus_repa_by_hand(tiny):
    cfg, params, batch = tiny
    module = JanusFlow(cfg)
    key = jax.random.key(11)
    loss, aux = jax.jit(lambda p: flow_training_loss(module, p, batch, key))(params)
    # Redo it by hand: same draws, uncached velocity, REPA on layer `repa.layer`.
    k_t, k_z, _ = jax.random.split(key, 3)
    x = batch["latents"]
    t = sample_flow_timesteps(k_t, (2,), cfg.flow.t_distribution, cfg.flow.t_mean, cfg.flow.t_std)
    z0 = jax.random.normal(k_z, x.shape)
    seg, pos = prompt_layout(batch["attention_mask"], jnp.ones((2,), bool), 1 + 4)
    ap = functools.partial(module.apply, {"params": params})
    prefix = ap(batch["input_ids"][:, :-1], method=lambda m, i: m.llm.embed_tokens(i))
    v = jax.jit(lambda p: module.apply({"params": p}, prefix, flow_interpolate(x, z0, t), t, seg, pos,
                                       method=JanusFlow.velocity))(params)
    np.testing.assert_allclose(float(aux["rf_loss"]), float(rectified_flow_loss(v, x, z0)), rtol=1e-5)

    def repa_by_hand(m):
        embeds, _, _ = m.generation_embeds(prefix, flow_interpolate(x, z0, t), t)
        _, mid = m.run_llm_split(embeds, seg, pos, cfg.repa.layer)
        proj = m.repa_head(mid[:, -4:])
        feats = m.vision(batch["pixel_values"])  # [2, 16, Dv] on a 4x4 grid -> 2x2 mean pool
        feats = feats.reshape(2, 2, 2, 2, 2, -1).mean(axis=(2, 4)).reshape(2, 4, -1)
        cos = jnp.sum(proj * feats, -1) / (jnp.linalg.norm(proj, axis=-1) * jnp.linalg.norm(feats, axis=-1))
        return -jnp.mean(cos)

    by_hand = jax.jit(lambda p: module.apply({"params": p}, method=repa_by_hand))(params)
    np.testing.assert_allclose(float(aux["repa_loss"]), float(by_hand), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(aux["rf_loss"] + aux["repa_loss"]), rtol=1e-6)


@pytest.mark.slow
def test_flow_loss_gradients_reach_the_right_params(tiny):
    cfg, params, batch = tiny
    grads = jax.jit(jax.grad(lambda p: flow_training_loss(JanusFlow(cfg), p, batch, jax.random.key(2))[0]))(params)
    norm = {k: float(optax.global_norm(v)) for k, v in grads.items()}
    for k in ("llm", "gen_encoder", "gen_decoder", "gen_enc_aligner", "gen_dec_aligner", "repa_head"):
        assert norm[k] > 0, k
    assert norm["vision"] == 0.0  # REPA targets are stop-gradient; SigLIP is not on the flow path
    assert norm["und_aligner"] == 0.0 and norm["beg_of_und_embed"] == 0.0


@pytest.mark.slow
def test_a_few_steps_lower_the_loss(tiny):
    cfg, params, batch = tiny
    tx = optax.adam(3e-3)
    module = JanusFlow(cfg)
    step = jax.jit(functools.partial(flow_train_step, module=module, tx=tx))
    state = TrainState.create(params, tx, jax.random.key(0))
    loss_fn = jax.jit(lambda p: flow_training_loss(module, p, batch, jax.random.key(99))[0])
    probe = lambda p: float(loss_fn(p))  # noqa: E731
    before = probe(state.params)
    for _ in range(8):
        state, metrics = step(state, batch)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 8
    assert probe(state.params) < 0.8 * before


@pytest.mark.slow
def test_accumulated_flow_step_averages_the_micro_batches(tiny):
    """grad_accum_steps=2: the update is the mean of the two micro-batches' (rows 0::2, 1::2)
    losses and gradients, micro-batch j drawing with fold_in(the step's key, j)."""
    cfg, params, batch = tiny
    module, tx = JanusFlow(cfg), optax.sgd(1.0)
    state = TrainState.create(params, tx, jax.random.key(5))
    new, metrics = jax.jit(functools.partial(flow_train_step, module=module, tx=tx, grad_accum_steps=2))(state, batch)
    _, (key,) = state.split_rng(1)

    def mean_loss(p):
        return sum(flow_training_loss(module, p, {k: v[j::2] for k, v in batch.items()},
                                      jax.random.fold_in(key, j))[0] for j in range(2)) / 2

    loss, grads = jax.jit(jax.value_and_grad(mean_loss))(params)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    want = jax.tree.map(lambda p, g: p - g, params, grads)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert int(new.step) == 1


def test_space_to_depth_latents_round_trip():
    cfg = tiny_janusflow_config(latent_kind="space_to_depth", latent_channels=192)
    validate_janusflow_config(cfg)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
    z = images_to_latents(x, cfg)
    assert z.shape == (2, 4, 4, 192)
    # latent pixel (0,0) channel (i*8 + j)*3 + c is image pixel (i, j) channel c, scaled
    np.testing.assert_allclose(np.asarray(z[0, 0, 0, (2 * 8 + 5) * 3 + 1]), np.asarray(x[0, 2, 5, 1]) * 0.13025,
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(latents_to_images(z, cfg)), np.asarray(x), atol=1e-6)


def test_config_and_batch_errors_name_the_field():
    cfg = tiny_janusflow_config()
    cfg.repa.layer = 3
    with pytest.raises(ValueError, match=r"model.repa.layer=3"):
        validate_janusflow_config(cfg)
    cfg = tiny_janusflow_config(latent_kind="space_to_depth")
    with pytest.raises(ValueError, match="model.latent.channels"):
        validate_janusflow_config(cfg)
    cfg = tiny_janusflow_config(patch_size=16)
    cfg.vision.patch_size = 32 // 3
    with pytest.raises(ValueError, match="model.vision.patch_size"):
        validate_janusflow_config(cfg)
    cfg = tiny_janusflow_config()
    batch = synthetic_flow_batch(cfg, 2, 5, 0, 0)
    check_flow_batch(batch, cfg)
    with pytest.raises(ValueError, match="missing 'pixel_values'"):
        check_flow_batch({k: v for k, v in batch.items() if k != "pixel_values"}, cfg)
    with pytest.raises(ValueError, match=r"latents have shape \(2, 8, 8, 4\), expected \(2, 4, 4, 4\)"):
        check_flow_batch(dict(batch, latents=np.zeros((2, 8, 8, 4))), cfg)


def test_configs_load_and_match_the_reference_sizes():
    import os

    from unimm_jax.config_files import load_config
    from unimm_jax.convert.janusflow_checkpoint import abstract_flow_params

    def load(name):
        return load_config(os.path.join("configs", f"{name}.py"))

    big = load("janusflow_1_3b").model
    validate_janusflow_config(big)
    assert (big.llm.hidden_size, big.llm.num_layers, big.llm.intermediate_size, big.llm.vocab_size) == (2048, 24, 5632, 102400)
    shapes = abstract_flow_params(big)
    count = lambda t: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))  # noqa: E731
    assert shapes["gen_encoder"]["in_conv"]["kernel"].shape == (2, 2, 4, 768)
    assert shapes["und_aligner"]["kernel"].shape == (1024, 2048)
    assert shapes["gen_dec_aligner"]["kernel"].shape == (2048, 768)
    assert count(shapes["llm"]) == 102400 * 2048 * 2 + 24 * (4 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048) + 2048
    tiny_cfg = load("shapes_flow_tiny")
    validate_janusflow_config(tiny_cfg.model)
    assert tiny_cfg.model.latent.kind == "space_to_depth" and tiny_cfg.model.family == "janusflow"
