"""A tiny JanusFlow on the synthetic shapes world, sized for a 2-core CPU.

    unimm-train --config configs/shapes_flow_tiny.py --workdir /tmp/shapes_flow

Model: 64 px images; SigLIP 128 wide, patch 8 (64 understanding tokens); LLM hidden 256,
4 layers, shapes-world word vocabulary; no VAE: latent.kind "space_to_depth" turns each 8x8
pixel patch into one 192-channel latent pixel (8x8x192 latents, exact inverse), and the 128-wide
ShallowUViT patchifies 2x2 -> 16 latent tokens. REPA aligns LLM layer 2 with SigLIP features
pooled to the 4x4 latent-token grid.

The generation loss is `unimm_jax.models.janusflow.flow_training_loss` and the step
`unimm_jax.train.flow_step.flow_train_step`; the trainer dispatches on
config.model.family == "janusflow" (see the README's JanusFlow section for what it still needs).
"""
import ml_collections

from unimm_jax.data.pipeline import default_data_config
from unimm_jax.data.shapes_vocab import build_shapes_tokenizer, shapes_token_ids
from unimm_jax.models.janusflow_config import janusflow_model_config
from unimm_jax.train.loop import train_block
from unimm_jax.train.optimizer import default_config as optim_config


def shapes_flow_model(**overrides) -> ml_collections.ConfigDict:
    tok = build_shapes_tokenizer()
    kwargs = dict(
        vocab_size=tok.vocab_size, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4,
        intermediate_size=688, rope_theta=10000.0, max_position_embeddings=1024,
        vision_hidden=128, vision_layers=2, vision_heads=4, image_size=64, patch_size=8,
        gen_width=128, gen_layers_in_middle=1, gen_patch=2,
        latent_kind="space_to_depth", vae_downsample=8, latent_channels=192, scaling_factor=1.5,
        repa_enabled=True, repa_layer=2, repa_hidden=256, **shapes_token_ids(tok))
    kwargs.update(overrides)
    return janusflow_model_config(**kwargs)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.kind = "janusflow"
    config.seed = 0
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.sharding = dict(rules=())  # () = unimm_jax.sharding.DEFAULT_RULES
    config.model = shapes_flow_model()
    config.data = default_data_config()
    config.data.source = "shapes"
    config.data.num_train = 20000  # the same shapes world (W/data) as configs/shapes_tiny.py
    config.data.num_test = 500
    config.data.batch_size = 16
    # LLM tokens per row (15 prompt + 1 time + 16 latent tokens), for the tokens_per_s metric only.
    config.data.seq_len = 32
    config.optim = optim_config(learning_rate=1e-3, warmup_steps=30, end_lr_fraction=0.05, b2=0.98,
                                weight_decay=0.05, clip_norm=1.0)
    config.train = train_block(num_steps=900, log_every=10, checkpoint_every=100, eval_every=0)
    # The Janus eval's held-out prompts (shapes.generation_prompts("test", 120, seed=0)).
    config.eval = dict(num_generation=120, steps=30, cfg_weight=2.0, seed=0, batch_size=60, grid_rows=8)
    return config
