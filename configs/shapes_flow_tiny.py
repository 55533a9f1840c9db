"""A tiny JanusFlow on the synthetic shapes world, trained by `unimm-train` on a CPU.

    unimm-train --config configs/shapes_flow_tiny.py --workdir W      # re-running resumes

does the whole job through the same trainer as configs/shapes_tiny.py (`train/loop.py`, with the
flow step selected by kind "janusflow"): builds the shapes world into W/data, trains text-to-image
rectified flow (orbax checkpoints in W/ckpt with the Grain iterator, SIGTERM saves,
W/metrics.jsonl), exports W/model (`unimm_jax.load_pretrained(W)`, `unimm-generate --checkpoint W`)
and scores the Janus eval's 120 held-out prompts with the same GenEval-style scorer into
W/eval.json (overall + per prompt kind) and W/samples.png (one column per prompt kind).
Text-to-image only: no understanding examples are mixed in, so SigLIP and the understanding
aligner stay untrained (and REPA, whose premise is a pretrained SigLIP, is off here; the tests
train with it on).

Model: 64 px images; LLM hidden 192, 3 layers, shapes-world word vocabulary; no VAE:
latent.kind "space_to_depth" turns each 4x4 pixel patch into one 48-channel latent pixel (16x16x48
latents, exact inverse), and the 192-wide ShallowUViT patchifies 2x2 -> 64 latent tokens of 192
values each. A first version used 8x8 patches (768 values per token) through a 128-wide UViT: the
narrow patchify could not carry the noise the velocity must cancel, so samples kept per-pixel
noise (rf loss stuck near 0.98, generation accuracy 0.0 after 900 steps).

Measured (2026-11-22, one core of a shared 2-core x86_64 CPU, `taskset -c 1`, jax 0.10.2):
600 steps of batch 16 at ~1.5-1.8 s/step, 781 CPU-seconds for the whole job (data, train,
export, eval; 26 min wall, the core shared with test runs); rf loss 1.55 at step 10 -> 0.26 at
600; generation accuracy on the 120 held-out prompts 0.142 overall: single 0.45, two_objects
0.10, left_of 0.05, above 0.20, count_two 0.05, count_three 0.00. Samples show the right colours
in roughly the right places but blocky, fragmented shapes (benchmarks/RESULTS.md, "Generation: VQ vs flow").
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
        vocab_size=tok.vocab_size, hidden_size=192, num_layers=3, num_heads=3, num_kv_heads=3,
        intermediate_size=512, rope_theta=10000.0, max_position_embeddings=1024,
        vision_hidden=128, vision_layers=2, vision_heads=4, image_size=64, patch_size=8,
        # 4x4-pixel patches -> 16x16x48 latents; the 2x2 patchify gives 64 latent tokens of
        # 2*2*48 = 192 values, as wide as the UViT (a narrower one cannot carry the noise to cancel).
        gen_width=192, gen_layers_in_middle=1, gen_patch=2,
        latent_kind="space_to_depth", vae_downsample=4, latent_channels=48, scaling_factor=1.5,
        repa_enabled=False, repa_layer=1, repa_hidden=192, **shapes_token_ids(tok))
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
    # LLM tokens per row (15 prompt + 1 time + 64 latent tokens), for the tokens_per_s metric only.
    config.data.seq_len = 80
    config.optim = optim_config(learning_rate=1.5e-3, warmup_steps=30, end_lr_fraction=0.05, b2=0.98,
                                weight_decay=0.05, clip_norm=1.0)
    config.train = train_block(num_steps=600, log_every=10, checkpoint_every=100, eval_every=0)
    # The Janus eval's held-out prompts (shapes.generation_prompts("test", 120, seed=0)).
    config.eval = dict(num_generation=120, steps=30, cfg_weight=2.0, seed=0, batch_size=60, grid_rows=8)
    return config
