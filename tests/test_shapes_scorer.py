"""The GenEval-style shapes scorer: right on correct renders, wrong on wrong ones, noise-robust."""
import dataclasses
import io

import numpy as np
import pytest
from scipy import ndimage

from unimm_jax.data import shapes
from unimm_jax.evals import shapes_scorer as scorer


def _prompt_scenes(n_per_kind, seed=0, image_size=64):
    rng = np.random.default_rng(seed)
    out = []
    for kind in shapes.CAPTION_KINDS:
        for _ in range(n_per_kind):
            prompt = shapes.sample_prompt(rng, kind)
            out.append((prompt, shapes.scene_for_prompt(prompt, rng, image_size)))
    return out


def _replace(scene, k, **changes):
    objs = list(scene.objects)
    objs[k] = dataclasses.replace(objs[k], **changes)
    return dataclasses.replace(scene, objects=tuple(objs))


def test_detections_match_rendered_objects():
    for _, scene in _prompt_scenes(20, seed=1):
        dets = scorer.detect_objects(shapes.render(scene))
        assert len(dets) == len(scene.objects)
        want = sorted((o.color, o.shape, o.bbox, int(shapes.object_mask(o).sum()))
                      for o in scene.objects)
        got = sorted((d.color, d.shape, d.bbox, d.area) for d in dets)
        assert got == want
        for d in dets:
            x0, y0, x1, y1 = d.bbox
            assert x0 < d.centroid[0] < x1 and y0 < d.centroid[1] < y1


@pytest.mark.parametrize("image_size,n_per_kind", [(64, 100), (32, 30), (128, 15)])
def test_correct_renders_score_correct(image_size, n_per_kind):
    pairs = _prompt_scenes(n_per_kind, seed=image_size, image_size=image_size)
    prompts = [p for p, _ in pairs]
    out = scorer.score_batch(prompts, np.stack([shapes.render(s) for _, s in pairs]))
    assert out["n"] == len(prompts)
    assert out["mean_per_kind"] == pytest.approx(np.mean(list(out["per_kind"].values())))
    assert set(out["per_kind"]) == set(shapes.CAPTION_KINDS)
    failures = [(p, r["reason"]) for p, r in zip(prompts, out["results"]) if not r["correct"]]
    assert out["overall"] >= 0.99, failures[:5]
    assert min(out["per_kind"].values()) >= 0.97, failures[:5]


def test_every_true_caption_scores_correct():
    rng = np.random.default_rng(3)
    for _ in range(80):
        scene = shapes.sample_scene(rng)
        image = shapes.render(scene)
        for caption, kind in shapes.captions_for(scene):
            r = scorer.score_image(caption, image)
            assert r["correct"] and r["kind"] == kind, (caption, r["reason"])


def _other(values, current, rng):
    return [v for v in values if v != current][rng.integers(len(values) - 1)]


def test_wrong_colour_or_shape_scores_incorrect():
    rng = np.random.default_rng(4)
    for prompt, scene in _prompt_scenes(30, seed=5):
        k = int(rng.integers(len(scene.objects)))
        wrong_c = _replace(scene, k, color=_other(shapes.COLORS, scene.objects[k].color, rng))
        wrong_s = _replace(scene, k, shape=_other(shapes.SHAPES, scene.objects[k].shape, rng))
        for bad in (wrong_c, wrong_s):
            r = scorer.score_image(prompt, shapes.render(bad))
            assert not r["correct"], (prompt, bad, r["reason"])


def test_wrong_count_scores_incorrect():
    rng = np.random.default_rng(6)
    kind_for_count = {1: "single", 2: "count_two", 3: "count_three"}
    for _ in range(30):
        combo = (shapes.COLORS[rng.integers(6)], shapes.SHAPES[rng.integers(3)])
        for n_prompt in (2, 3):
            prompt = shapes.format_prompt(kind_for_count[n_prompt], [combo])
            for n_drawn in (1, 2, 3):
                drawn = shapes.format_prompt(kind_for_count[n_drawn], [combo])
                scene = shapes.scene_for_prompt(drawn, rng)
                assert len(scene.objects) == n_drawn
                r = scorer.score_image(prompt, shapes.render(scene))
                assert r["correct"] == (n_drawn == n_prompt), (prompt, n_drawn, r["reason"])


def test_missing_object_scores_incorrect():
    rng = np.random.default_rng(7)
    for kind in ("two_objects", "left_of", "above"):
        for _ in range(20):
            prompt = shapes.sample_prompt(rng, kind)
            scene = shapes.scene_for_prompt(prompt, rng)
            for k in (0, 1):
                only = dataclasses.replace(scene, objects=(scene.objects[k],))
                assert not scorer.score_image(prompt, shapes.render(only))["correct"]


def test_swapped_positions_score_incorrect():
    rng = np.random.default_rng(8)
    for kind in ("left_of", "above"):
        for _ in range(60):
            prompt = shapes.sample_prompt(rng, kind)
            scene = shapes.scene_for_prompt(prompt, rng)
            a, b = scene.objects
            # Swap identities, keep the (valid) geometry: A now sits where B was.
            swapped = dataclasses.replace(scene, objects=(
                dataclasses.replace(a, color=b.color, shape=b.shape),
                dataclasses.replace(b, color=a.color, shape=a.shape)))
            assert scorer.score_image(prompt, shapes.render(scene))["correct"]
            r = scorer.score_image(prompt, shapes.render(swapped))
            assert not r["correct"] and "not" in r["reason"], (prompt, r["reason"])


def test_blank_image_scores_incorrect():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert scorer.detect_objects(blank) == []
    for prompt in shapes.generation_prompts("test", 12):
        r = scorer.score_image(prompt, blank)
        assert not r["correct"] and "found 0" in r["reason"]


def test_noise_does_not_break_detection():
    rng = np.random.default_rng(9)
    pairs = _prompt_scenes(25, seed=10)
    correct = []
    for prompt, scene in pairs:
        img = shapes.render(scene).astype(np.float32)
        noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        # Plus speckles: 1% of pixels set to random palette colours.
        speckle = rng.random(img.shape[:2]) < 0.01
        noisy[speckle] = np.array(list(shapes.PALETTE.values()))[
            rng.integers(6, size=int(speckle.sum()))]
        correct.append(scorer.score_image(prompt, noisy)["correct"])
    assert np.mean(correct) >= 0.99


def _jpeg(image, quality):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf))


@pytest.mark.parametrize("name,perturb,threshold", [
    ("blur", lambda x: np.round(ndimage.gaussian_filter(x.astype(np.float32), (0.7, 0.7, 0))
                                ).astype(np.uint8), 0.97),
    ("jpeg75", lambda x: _jpeg(x, 75), 0.93),
])
def test_soft_edges_do_not_break_detection(name, perturb, threshold):
    pairs = _prompt_scenes(25, seed=12)
    correct = [scorer.score_image(p, perturb(shapes.render(s)))["correct"] for p, s in pairs]
    assert np.mean(correct) >= threshold, name


def test_float_images_in_minus_one_one():
    prompt, scene = _prompt_scenes(1, seed=11)[3]
    img = shapes.render(scene).astype(np.float32) / 127.5 - 1.0
    assert scorer.score_image(prompt, img)["correct"]
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        scorer.detect_objects(img[..., :1])
    with pytest.raises(ValueError, match="dtype"):
        scorer.detect_objects(img.astype(np.int32))


def test_unknown_shapes_are_not_counted():
    img = np.full((64, 64, 3), 255, np.uint8)
    img[10:14, 5:40] = shapes.PALETTE["red"]  # a long thin bar is no shape of this world
    dets = scorer.detect_objects(img)
    assert [d.shape for d in dets] == ["unknown"]
    assert not scorer.score_image("a red square", img)["correct"]


def test_score_batch_and_prompt_errors():
    with pytest.raises(ValueError, match="outside the shapes-world grammar"):
        scorer.score_image("a pink elephant", np.full((64, 64, 3), 255, np.uint8))
    with pytest.raises(ValueError, match="2 prompts but 1 images"):
        scorer.score_batch(["a red circle", "a red square"], [np.zeros((64, 64, 3), np.uint8)])


def test_score_answers():
    qs = ["What color is the circle?", "What shape is the red object?",
          "How many shapes are there?", "Is there a blue square?", "Is there a red circle?"]
    answers = ["red", "circle", "two", "no", "yes"]
    preds = [" Red.", "CIRCLE", "2", "no", "no"]
    out = scorer.score_answers(qs, answers, preds)
    assert out["n"] == 5
    assert out["overall"] == pytest.approx(3 / 5)
    assert out["per_kind"] == {"color": 1.0, "shape": 1.0, "count": 0.0, "exists": 0.5}
    with pytest.raises(ValueError, match="one to one"):
        scorer.score_answers(qs, answers, preds[:2])
    with pytest.raises(ValueError, match="not a shapes-world question"):
        scorer.score_answers(["Who are you?"], ["me"], ["me"])


def test_score_answers_on_generated_examples():
    exs = [shapes.make_example(i) for i in range(60)]
    qs, ans = [e["question"] for e in exs], [e["answer"] for e in exs]
    assert scorer.score_answers(qs, ans, ans)["overall"] == 1.0
    flipped = ["no" if a == "yes" else "yes" if a == "no" else "purple-ish" for a in ans]
    assert scorer.score_answers(qs, ans, flipped)["overall"] == 0.0
