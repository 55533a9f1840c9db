"""SigLIP pretraining stage: concept targets and loss by hand, the stage learns on a tiny shapes
world, writes W/vision once (a rerun loads it), and the job hands its params to the Janus init."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm_jax.data.pipeline import default_data_config
from unimm_jax.data.shapes_tfds import build_shapes_world
from unimm_jax.models.janus_config import tiny_janus_config
from unimm_jax.train import loop, vision_pretrain as vp


def test_concept_targets_by_hand():
    multi_hot, counts = vp.concept_targets(
        ["a red circle and a blue square", "three green triangles", "a red circle above a red circle"])
    assert multi_hot.shape == (3, 18) and counts.tolist() == [1, 2, 1]
    assert np.flatnonzero(multi_hot[0]).tolist() == sorted(
        [vp.CONCEPTS.index(("red", "circle")), vp.CONCEPTS.index(("blue", "square"))])
    assert np.flatnonzero(multi_hot[1]).tolist() == [vp.CONCEPTS.index(("green", "triangle"))]
    assert multi_hot[2].sum() == 1  # the same pair twice is one concept; the count says two
    with pytest.raises(ValueError, match="outside the shapes-world grammar"):
        vp.concept_targets(["a pink hexagon"])


def test_concept_loss_and_accuracy_by_hand():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 21)).astype(np.float32)
    multi_hot, counts = vp.concept_targets(["a red circle", "two blue squares", "a green triangle and a red square",
                                            "three purple circles"])
    p = 1 / (1 + np.exp(-logits[:, :18]))
    bce = -(multi_hot * np.log(p) + (1 - multi_hot) * np.log(1 - p)).sum(1)
    z = logits[:, 18:]
    ce = np.log(np.exp(z).sum(1)) - z[np.arange(4), counts]
    np.testing.assert_allclose(float(vp.concept_loss(jnp.asarray(logits), multi_hot, counts)), (bce + ce).mean(),
                               rtol=1e-5)
    perfect = np.concatenate([np.where(multi_hot > 0, 5.0, -5.0), np.eye(3)[counts] * 5], axis=1)
    assert vp.concept_accuracy(perfect, multi_hot, counts) == {"concept": 1.0, "exact": 1.0, "count": 1.0}
    perfect[0, 0] = -perfect[0, 0]
    acc = vp.concept_accuracy(perfect, multi_hot, counts)
    assert acc["exact"] == 0.75 and acc["count"] == 1.0


def test_token_concept_targets_by_hand():
    """A 32-px image, patch 16 (2 x 2 tokens): a red square across the top two patches (8 px in the
    right one: exactly MIN_PIXELS), a blue circle in the bottom-left; red named with one shape,
    blue with two (masked)."""
    from unimm_jax.data import shapes

    img = np.full((1, 32, 32, 3), 255, np.uint8)
    img[0, 2:10, 4:17] = shapes.PALETTE["red"]  # 8 rows x (12 columns in token 0, 1 in token 1)
    img[0, 20:28, 3:11] = shapes.PALETTE["blue"]
    target, mask = vp.token_concept_targets(img, ["a red square above a blue circle"], 16)
    red_sq, blue_ci = vp.CONCEPTS.index(("red", "square")), vp.CONCEPTS.index(("blue", "circle"))
    assert target.shape == mask.shape == (1, 4, 18) and mask.all()
    assert np.flatnonzero(target[0, 0]).tolist() == [red_sq]
    assert np.flatnonzero(target[0, 1]).tolist() == [red_sq]  # 8 pixels: counts
    assert np.flatnonzero(target[0, 2]).tolist() == [blue_ci]
    assert target[0, 3].sum() == 0
    img[0, 2:9, 16] = 255  # 7 red pixels left in token 1: below MIN_PIXELS
    target, _ = vp.token_concept_targets(img, ["a red square above a blue circle"], 16)
    assert target[0, 1].sum() == 0
    # blue named with two shapes: which one a blue patch shows is unknown, so blue is masked
    target, mask = vp.token_concept_targets(img, ["a blue circle and a blue square"], 16)
    blue = [vp.CONCEPTS.index(("blue", s)) for s in shapes.SHAPES]
    assert (mask[0][:, blue] == 0).all() and mask[0].sum() == 4 * 15 and target[0][:, blue].sum() == 0
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        vp.token_concept_targets(img, ["a red square"], 12)
    # loss: masked BCE summed over concepts, mean over tokens
    logits = np.random.default_rng(0).normal(size=(1, 4, 18)).astype(np.float32)
    p = 1 / (1 + np.exp(-logits))
    bce = -(target * np.log(p) + (1 - target) * np.log(1 - p))
    np.testing.assert_allclose(float(vp.token_concept_loss(jnp.asarray(logits), target, mask)),
                               (mask * bce).sum(-1).mean(), rtol=1e-5)
    assert vp.token_concept_accuracy(np.where(target > 0, 3.0, -3.0), target, mask) == 1.0


def _data(tmp_path, n_train=64):
    d = default_data_config()
    d.data_dir, d.num_train, d.num_test = str(tmp_path / "data"), n_train, 16
    build_shapes_world(d.data_dir, d.image_size, d.num_train, d.num_test, d.seed)
    return d


def _vision_cfg():
    v = tiny_janus_config().vision
    v.image_size, v.patch_size = 64, 16
    return v


def test_pretrain_vision_learns_writes_once_and_matches_janus_layout(tmp_path):
    d = _data(tmp_path)
    pre = vp.vision_pretrain_block(num_steps=40, batch_size=16, learning_rate=3e-3, warmup_steps=5,
                                   num_images=64, log_every=10, token_weight=1.0)
    out = vp.pretrain_vision(_vision_cfg(), pre, d, tmp_path / "vision")
    rows = [json.loads(line) for line in open(tmp_path / "vision" / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0], losses
    assert set(out["metrics"]) == {"concept", "exact", "count", "token"}
    assert os.path.isfile(tmp_path / "vision" / vp.DONE_FILE)
    # the subtree is the Janus `vision` subtree: same paths and shapes
    from flax import linen as nn
    from unimm_jax.models.janus import Janus
    cfg = tiny_janus_config()
    cfg.vision.image_size, cfg.vision.patch_size = 64, 16
    janus = jax.eval_shape(lambda k: nn.unbox(Janus(cfg).init(k, *loop._init_inputs(cfg), method=Janus.init_all))
                           ["params"], jax.random.key(0))
    assert (jax.tree.map(lambda x: x.shape, janus["vision"]) == jax.tree.map(np.shape, out["params"]))
    # a second call loads what the first wrote instead of training again
    again = vp.pretrain_vision(_vision_cfg(), pre, d, tmp_path / "vision")
    assert again["metrics"] == {}
    jax.tree.map(np.testing.assert_array_equal, again["params"], out["params"])


def test_pretrain_vision_resumes_to_the_same_params(tmp_path):
    """Stopped after 7 steps (a checkpoint every 5 plus the forced save at the stop), then re-run:
    the same params and metrics as one run straight through; nothing is written to params/ early."""
    d = _data(tmp_path)
    pre = vp.vision_pretrain_block(num_steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=2,
                                   num_images=64, log_every=4, token_weight=1.0, checkpoint_every=5)
    straight = vp.pretrain_vision(_vision_cfg(), pre, d, tmp_path / "straight")
    first = vp.pretrain_vision(_vision_cfg(), pre, d, tmp_path / "resumed", stop_after=7)
    assert first["stopped_early"] and first["params"] is None
    assert not os.path.exists(tmp_path / "resumed" / vp.DONE_FILE)
    assert not os.path.exists(tmp_path / "resumed" / vp.PARAMS_DIR)
    resumed = vp.pretrain_vision(_vision_cfg(), pre, d, tmp_path / "resumed")
    assert not resumed["stopped_early"] and resumed["metrics"] == straight["metrics"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 resumed["params"], straight["params"])
    steps = [json.loads(line)["step"] for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    assert [s for s in steps if s <= 12] == [4, 8, 12, 12]  # losses at 4 (first call), 8, 12; test metrics at 12


def test_vision_stage_is_off_by_default_and_rejects_zero_steps(tmp_path):
    import ml_collections
    c = ml_collections.ConfigDict(dict(model=dict(vision=_vision_cfg()), data=default_data_config(), seed=0))
    assert loop._vision_stage(c, str(tmp_path)) is None  # no vision_pretrain block
    c.vision_pretrain = vp.vision_pretrain_block()  # num_steps 0
    assert loop._vision_stage(c, str(tmp_path)) is None
    with pytest.raises(ValueError, match="num_steps must be > 0"):
        vp.pretrain_vision(_vision_cfg(), c.vision_pretrain, c.data, tmp_path / "v")


def test_gen_embed_from_vq_is_the_unit_codebook_at_the_init_scale():
    book = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32) * 0.01
    out = loop.gen_embed_from_vq({"codebook": {"embedding": book}})["embedding"]
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.sqrt(8), rtol=1e-5)
    np.testing.assert_allclose(out / np.sqrt(8), book / np.linalg.norm(book, axis=-1, keepdims=True), rtol=1e-5)


def test_with_pretrained_replaces_only_the_named_subtrees():
    params = {"vision": {"w": jnp.zeros((2, 3), jnp.bfloat16)}, "llm": {"w": jnp.ones(4)}}
    out = loop._with_pretrained(params, {"vision": {"w": np.full((2, 3), 2.0, np.float32)}})
    assert out["vision"]["w"].dtype == jnp.bfloat16 and float(out["vision"]["w"][0, 0]) == 2.0
    assert out["llm"] is params["llm"]


def test_with_pretrained_names_a_shape_mismatch():
    params = {"vision": {"pos_embed": jnp.zeros((16, 8))}}
    with pytest.raises(ValueError, match=r"pretrained vision param \['pos_embed'\] has shape \(64, 8\)"):
        loop._with_pretrained(params, {"vision": {"pos_embed": np.zeros((64, 8), np.float32)}})
