"""The default job: a tiny Janus-style model on the synthetic shapes world, on CPU.

    unimm-train --config configs/shapes_tiny.py --workdir /tmp/shapes

does everything: builds the shapes world into W/data, trains the VQ tokenizer into W/tokenizer
(unless tokenizer.checkpoint names one) and, side by side with it, pretrains the SigLIP tower on
caption concepts into W/vision (config.vision_pretrain; Janus starts from a pretrained SigLIP),
trains the unified model on understanding alone for 160 steps (config.pre_stage, into
W/pre_stage) and then on the mixture (understanding : text : generation = 3 : 1 : 4, an
understanding example being a dialogue of up to 4 questions, none answerable from the earlier
answers; Janus-Pro stage 2: SigLIP and VQ frozen), exports W/model (unimm format +
tokenizer.json), evaluates into W/eval.json and writes W/samples.png.
Measured figures (time, accuracy per kind) and what each choice bought are in
benchmarks/RESULTS.md ("Default job"): understanding 0.960 on the test split (target 0.9),
generation 0.617 on 360 held-out prompts (target 0.6; session 19, clean clone, 25.3 min with pip).

Sized for a 2-core CPU (choices measured on this machine, 2026-11-22/23 and 2026-12-06/07):
- VQ: 8x downsampling (64 codes per image, codebook 128 x 8), 8-channel levels with no encoder
  res blocks (~4x cheaper per step than 16 channels), a local encoder (vq.encoder_context: no
  attention, per-pixel norms, so an object's codes do not change with what else is in the
  image: 0.999 vs 0.573 agreement), lr 8e-3, 4000 steps of 8 images, object
  pixels weighted 4x (tokenizer.foreground_weight=3). Flat patches share one latent and codes
  inside another's cluster are restarted (constant_patch_weight, merge_distance): white takes one
  code (0.1-0.4 nats at white patches, was 4.8 over ~250 codes of 512). Held-out scenes' round
  trips score 0.742 / 0.792 (seeds 0 / 1) with the GenEval-style scorer (global encoder: 0.717 /
  0.692; local at 2000 steps: 0.583).
- SigLIP patch 16: 16 understanding tokens per image; pretrained 8000 steps of 32 images at lr
  2e-3 (~3 min) on pooled and per-token colour-shape concepts (token_weight). Held-out images
  (train records 15000-15499, which the tower does not see) with all 18 concepts right, init seeds
  0 / 1 / 2: 0.954 / 0.956 / 0.946 (tokens with all their concepts right 0.987-0.988), against
  0.736 / 0.862 / 0.758 with the 4800 steps at lr 3e-3 used until 2026-12-07 (4800 at 2e-3: 0.828
  / 0.846 / 0.818; at 1.5e-3 and 1e-3 lower; 9600 of 16: 0.87). The LLM's understanding follows
  the tower: 0.864 on the test split with the seed-0 tower of the old recipe, 0.892 with its
  seed-1 tower, 0.904 with 4800 steps at 2e-3 (benchmarks/RESULTS.md, session 15).
- LLM: hidden 128, 3 layers, 4 heads of 32, MLP 384; 160 understanding steps then 1450 mixed at
  ~0.37-0.43 s/step (layers unrolled; 1300 saved ~1 min but left understanding at 0.900 against
  0.924, generation 0.275 against 0.333 and NLL 0.588 against 0.575). Since 2026-12-07 it replaces
  hidden 192 with 6 heads of 32 and 100 + 900 steps at ~0.6 s/step, in the same ~10 min: held-out
  generation NLL 0.581 against 0.604 (another init seed of the old model: 0.610) with the same
  understanding (0.815 against 0.813 on 756 test questions); hidden 96 with 220 + 2000 steps:
  0.584 and 0.795, 4 or 5 layers at hidden 128: 0.598 and 0.635 (benchmarks/RESULTS.md, session
  14). Muon on the LLM's hidden matrices (optim.optimizer="muon", train/muon.py; AdamW on the
  embeddings, heads, norms and biases) at lr 3e-3: on the same data, tokenizer and tower, AdamW at
  lr 1e-3 (the best AdamW rate: 3e-3 washed the image information out of the answer position)
  scored understanding 0.920, generation 0.314, NLL 0.574; Muon at 1e-3 / 2e-3 / 3e-3 0.986 /
  0.982 / 0.956, 0.472 / 0.517 / 0.567, 0.489 / 0.463 / 0.453 (train-split prompts: 0.517 /
  0.528 / 0.604; benchmarks/RESULTS.md, session 18); loss = weighted mean of per-task means
  (train.task_weights: understanding 2, generation 4); gen_embed starts from the VQ's code vectors
  (train.gen_embed_from_vq).
"""
import ml_collections

from unimm_jax.data.pipeline import default_data_config
from unimm_jax.data.shapes_vocab import build_shapes_tokenizer, shapes_token_ids
from unimm_jax.models.janus_config import janus_model_config
from unimm_jax.train.loop import pre_stage_block, stage_config, train_block
from unimm_jax.train.optimizer import default_config as optim_config
from unimm_jax.train.vision_pretrain import vision_pretrain_block
from unimm_jax.train.vq_trainer import vq_train_block


def shapes_model(**overrides) -> ml_collections.ConfigDict:
    """The shapes-world Janus (also used by configs/shapes_vq.py, so the VQs agree)."""
    tok = build_shapes_tokenizer()
    kwargs = dict(
        vocab_size=tok.vocab_size, hidden_size=128, num_layers=3, num_heads=4, num_kv_heads=4, head_dim=32,
        intermediate_size=384, rope_theta=10000.0, max_position_embeddings=1024,
        vision_hidden=128, vision_layers=2, vision_heads=4, image_size=64, patch_size=16,
        vq_base_channels=8, vq_channel_multiplier=(1, 1, 2, 4), vq_latent_channels=64,
        codebook_size=128, codebook_dim=8, num_res_blocks=0, **shapes_token_ids(tok))
    kwargs.update(overrides)
    m = janus_model_config(**kwargs)
    m.vq.norm_groups = 8  # 8-channel VQ levels: GroupNorm of one channel per group at full size
    # A patch's code depends only on nearby pixels: with the global encoder an object's patches
    # kept their code only 57% of the time when another object was added elsewhere (0.999 local).
    m.vq.encoder_context = "local"
    m.gen_head.hidden_size = m.llm.hidden_size
    m.llm.scan_layers = False  # 3 layers: unrolled, XLA:CPU's step is ~16% faster (940 -> 790 ms; no loop slicing)
    # q / k start at 4x the usual init (std 0.08): from near-uniform attention the LLM settles on
    # reading the image as a bag of colours and shapes; with it, understanding-only training learns
    # "is there a {colour} {shape}?" (0.93 against 0.54 after 600 steps, benchmarks/RESULTS.md).
    m.llm.qk_init_scale = 4.0
    return m


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.kind = "janus"
    config.seed = 0
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    config.sharding = dict(rules=())  # () = unimm_jax.sharding.DEFAULT_RULES
    config.model = shapes_model()
    config.data = default_data_config()
    config.data.source = "shapes"
    config.data.num_train = 20000
    config.data.num_test = 500
    config.data.seq_len = 256
    config.data.batch_size = 16
    config.data.max_images_per_row = 6  # understanding dialogues are ~60 tokens: up to 4 fit a row
    config.data.questions_per_image = 4  # each understanding example asks 4 questions of its image
    # Flat patches share one latent (constant_patch_weight) and a code inside another's cluster is
    # restarted (merge_distance): white gets one code instead of ~250 interchangeable ones.
    # Batch 8 x 4000 steps: the images (and the CPU time: ~9 ms per image at batch 8 or 16) of
    # 16 x 2000, in twice the updates (round trips 0.717 vs 0.625 on the eval's scenes).
    config.tokenizer = vq_train_block(num_steps=4000, batch_size=8, learning_rate=8e-3, warmup_steps=20,
                                      restart_every=50, foreground_weight=3.0, constant_patch_weight=1.0,
                                      merge_distance=0.1, log_every=100)
    # SigLIP pretraining (sigmoid loss on caption concepts) stands in for Janus' pretrained SigLIP:
    # without it the LLM never learns to read the image tokens within the budget.
    # token_weight: every token also learns which objects it shows, which is what the LLM's
    # attention reads (a pooled-only tower left shape questions at 0.46).
    # Batch 32 (more updates for the same images beat larger batches: 0.846 vs 0.694 in session 8),
    # 8000 steps at lr 2e-3: at 3e-3 and 4800 steps the result swung with the init seed (0.74-0.86
    # of held-out images with every concept right; now 0.95 for seeds 0-2), and the LLM's
    # understanding follows the tower.
    # Side by side with the VQ stage (two threads): each one's small steps leave part of the 2 CPU
    # cores idle (220 s one after the other, 161 s side by side; the same params either way).
    config.vision_pretrain = vision_pretrain_block(num_steps=8000, batch_size=32, learning_rate=2e-3,
                                                   warmup_steps=30, num_images=12000, token_weight=1.0,
                                                   log_every=100, concurrent_with_tokenizer=True)
    # Muon (orthogonalised momentum, scaled to AdamW's update RMS) on the hidden matrices: in the
    # same steps it took generation from 0.314 to 0.567 and understanding from 0.920 to 0.956 (at
    # 3e-3; 2e-3: 0.517 / 0.982), for ~5% more time per step. With AdamW alone, 1e-3 was the best
    # rate: at 3e-3 its first updates washed the image information out of the answer position.
    config.optim = optim_config(optimizer="muon", learning_rate=3e-3, warmup_steps=30, end_lr_fraction=0.05,
                                b2=0.98, weight_decay=0.05, clip_norm=1.0)
    # Janus-Pro stage 2 (all but the encoders): the pretrained SigLIP stays frozen, as Janus-Pro
    # keeps it in stage 2; training it with the LLM learned understanding more slowly (0.64 vs 0.68).
    # 3:1:4 rather than Janus-Pro's 5:1:4: an understanding example is a dialogue of up to 4 questions.
    config.stage = stage_config(2, mixture=(3, 1, 4))
    # First 160 steps of understanding only (W/pre_stage), then the mixture from their params: the
    # image-reading attention forms before generation shares the LLM (exists 0.93 against 0.58).
    config.pre_stage = pre_stage_block(num_steps=160, stage=2, mixture=(1, 0, 0))
    # Task-mean loss: a one-word answer has ~2 loss tokens next to a generation example's 65.
    # Generation weighted 4 (was 1): on the same data, tokenizer and tower, generation weights 1 / 2 / 4
    # gave held-out NLL 0.453 / 0.451 / 0.443, test prompts 0.567 / 0.575 / 0.617, train prompts
    # 0.604 / 0.611 / 0.607 and understanding 0.956 / 0.956 / 0.960 (benchmarks/RESULTS.md, session 19).
    config.train = train_block(num_steps=1450, log_every=10, checkpoint_every=100, eval_every=0,
                               task_weights=dict(understanding=2.0, text=0.25, generation=4.0),
                               gen_embed_from_vq=True)
    # Understanding on every test image (one question each: the whole split) and generation on 360
    # prompts: with 200 / 120 one run's figures moved by 0.03-0.04 with the draw (RESULTS.md).
    # CFG 2 at temperature 0.8, chosen on 720 train-split prompts x 3 seeds (never the test ones):
    # 0.321 against 0.280 for CFG 3 / T 1 (CFG 5 and 8, top-k 16 / 32, T 0.6: no better; RESULTS.md).
    config.eval = dict(num_understanding=500, num_generation=360, cfg_weight=2.0, temperature=0.8,
                       top_k=0, max_new_tokens=4, grid_size=8, seed=0)
    return config
