"""The synthetic shapes world obeys its spec; the TFDS builder round-trips it exactly."""
import collections

import numpy as np
import pytest

from unimm_jax.data import shapes

PALETTE = {
    "red": (230, 25, 75), "green": (60, 180, 75), "blue": (0, 130, 200),
    "yellow": (255, 225, 25), "purple": (145, 30, 180), "orange": (245, 130, 48),
}


def _scenes(n, image_size=64, seed=0):
    """Random scenes from both samplers: sample_scene and scene_for_prompt of every kind."""
    rng = np.random.default_rng(seed)
    out = [shapes.sample_scene(rng, image_size) for _ in range(n)]
    for i in range(n):
        kind = shapes.CAPTION_KINDS[i % len(shapes.CAPTION_KINDS)]
        out.append(shapes.scene_for_prompt(shapes.sample_prompt(rng, kind), rng, image_size))
    return out


def test_palette_matches_spec():
    assert shapes.PALETTE == PALETTE
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.half_extent_range(64) == (6, 11)


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_scenes_obey_geometry(image_size):
    lo, hi = shapes.half_extent_range(image_size)
    assert lo == round(6 * image_size / 64) and hi == round(11 * image_size / 64)
    counts = collections.Counter()
    for scene in _scenes(150, image_size):
        assert 1 <= len(scene.objects) <= 3
        counts[len(scene.objects)] += 1
        for k, obj in enumerate(scene.objects):
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 and 0 <= y0 and x1 < image_size and y1 < image_size, obj
            assert lo <= obj.r <= hi
            for other in scene.objects[k + 1:]:
                assert shapes.bbox_gap(obj, other) >= 2, (obj, other)
    assert set(counts) == {1, 2, 3}


def test_render_is_crisp_and_exact():
    for scene in _scenes(100):
        img = shapes.render(scene)
        assert img.dtype == np.uint8 and img.shape == (64, 64, 3)
        expected = np.full((64, 64, 3), 255, np.uint8)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            mask = shapes.object_mask(obj)
            expected[y0:y1 + 1, x0:x1 + 1][mask] = PALETTE[obj.color]
            # The shape touches all four sides of its bounding box.
            assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        np.testing.assert_array_equal(img, expected)
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours == {(255, 255, 255)} | {PALETTE[o.color] for o in scene.objects}


def test_shape_masks_have_the_right_geometry():
    for r in range(6, 12):
        sq = shapes.object_mask(shapes.ShapeObject("red", "square", 0, 0, r))
        ci = shapes.object_mask(shapes.ShapeObject("red", "circle", 0, 0, r))
        tr = shapes.object_mask(shapes.ShapeObject("red", "triangle", 0, 0, r))
        assert sq.all()
        assert abs(ci.mean() - np.pi / 4) < 0.05 and (ci == ci[::-1]).all()
        assert abs(tr.mean() - 0.5) < 0.03
        # Apex up: the top row is one pixel at the centre, the bottom row is full width.
        assert tr[0].sum() == 1 and tr[0, r] and tr[-1].all()
        assert (tr == tr[:, ::-1]).all()  # isosceles


def _caption_holds(scene, caption):
    """Independent check of a caption against a scene's objects."""
    spec = shapes.parse_prompt(caption)
    combos = collections.Counter((o.color, o.shape) for o in scene.objects)
    need = collections.Counter(spec.objects)
    if spec.exact_count:
        return all(combos[c] == n for c, n in need.items())
    if not all(combos[c] >= n for c, n in need.items()):
        return False
    if spec.relation:
        a = [o for o in scene.objects if (o.color, o.shape) == spec.objects[0]]
        b = [o for o in scene.objects if (o.color, o.shape) == spec.objects[1]]
        axis = "cx" if spec.relation == "left_of" else "cy"
        return all(getattr(q, axis) - getattr(p, axis) >= p.r + q.r for p in a for q in b)
    return True


def test_captions_are_true_and_cover_every_kind():
    kinds = collections.Counter()
    for scene in _scenes(200):
        caps = shapes.captions_for(scene)
        assert len(caps) == len(set(caps))
        for caption, kind in caps:
            assert shapes.parse_prompt(caption).kind == kind
            assert _caption_holds(scene, caption), (scene, caption)
            kinds[kind] += 1
        # Every object is named by a single-object caption.
        singles = {c for c, k in caps if k == "single"}
        assert singles == {f"a {o.color} {o.shape}" for o in scene.objects}
    assert set(kinds) == set(shapes.CAPTION_KINDS)


def test_scene_for_prompt_holds_exactly_the_prompt():
    rng = np.random.default_rng(1)
    for i in range(300):
        prompt = shapes.sample_prompt(rng, shapes.CAPTION_KINDS[i % 6])
        scene = shapes.scene_for_prompt(prompt, rng)
        spec = shapes.parse_prompt(prompt)
        assert [(o.color, o.shape) for o in scene.objects] == list(spec.objects)
        assert prompt in {c for c, _ in shapes.captions_for(scene)}, (prompt, scene)


def test_questions_have_correct_answers():
    rng = np.random.default_rng(2)
    yes_no = collections.Counter()
    for scene in _scenes(200):
        qas = shapes.questions_for(scene, rng)
        objs = scene.objects
        kinds = collections.Counter(shapes.question_kind(q) for q, _ in qas)
        assert kinds["count"] == 1 and kinds["exists"] == 2
        for q, a in qas:
            kind = shapes.question_kind(q)
            words = q.rstrip("?").split()
            if kind == "color":
                match = [o for o in objs if o.shape == words[-1]]
                assert len(match) == 1 and a == match[0].color
            elif kind == "shape":
                match = [o for o in objs if o.color == words[-2]]
                assert len(match) == 1 and a == match[0].shape
            elif kind == "count":
                assert a == ["one", "two", "three"][len(objs) - 1]
            else:
                present = scene.count(words[-2], words[-1]) > 0
                assert a == ("yes" if present else "no")
                yes_no[a] += 1
        # Colour questions exist exactly for the shapes that are unique in the scene.
        unique_shapes = {s for s in shapes.SHAPES if scene.count(shape=s) == 1}
        assert kinds["color"] == len(unique_shapes)
        unique_colors = {c for c in shapes.COLORS if scene.count(color=c) == 1}
        assert kinds["shape"] == len(unique_colors)
    assert yes_no["yes"] == yes_no["no"]


@pytest.mark.parametrize("earlier, question, leaks", [
    ([("What color is the square?", "red")], "Is there a red square?", True),
    ([("What color is the square?", "red")], "Is there a blue square?", True),  # the one square is red
    ([("What color is the square?", "red")], "What shape is the red object?", True),
    ([("What color is the square?", "red")], "Is there a red circle?", False),
    ([("What color is the square?", "red")], "What color is the circle?", False),
    ([("What shape is the blue object?", "circle")], "Is there a blue triangle?", True),
    ([("What shape is the blue object?", "circle")], "What color is the circle?", True),
    ([("What shape is the blue object?", "circle")], "Is there a green circle?", False),
    ([("Is there a red square?", "yes")], "What color is the square?", True),
    ([("Is there a red square?", "yes")], "Is there a blue square?", False),  # squares may repeat
    ([("Is there a red square?", "no")], "What color is the square?", False),
    ([("Is there a red square?", "no")], "Is there a red circle?", False),
    ([("What color is the square?", "red"), ("What color is the circle?", "blue")],
     "How many shapes are there?", False),
    ([("What color is the square?", "red"), ("What color is the circle?", "blue"),
      ("What color is the triangle?", "green")], "How many shapes are there?", True),
    ([], "Is there a red square?", False),
])
def test_answerable_from_earlier_turns(earlier, question, leaks):
    assert shapes.answerable_from(earlier, question) is leaks


def test_answerable_from_is_right_on_real_scenes():
    """Whenever earlier true answers make a question answerable, every scene that gives those
    answers gives the same answer to it (checked by brute force over random scenes)."""
    rng = np.random.default_rng(0)
    answers_given = collections.defaultdict(set)  # (earlier turns, question) -> answers seen
    for _ in range(3000):
        scene = shapes.sample_scene(rng)
        qas = shapes.questions_for(scene, rng)
        for i, first in enumerate(qas):
            for q, a in qas[:i] + qas[i + 1:]:
                if shapes.answerable_from([first], q):
                    answers_given[(first, q)].add(a)
    assert len(answers_given) > 100
    assert all(len(a) == 1 for a in answers_given.values())


def test_qa_pairs_round_trip_and_bad_text():
    qas = [("What color is the circle?", "red"), ("How many shapes are there?", "two")]
    text = shapes.format_qa_pairs(qas)
    assert text == "What color is the circle?\tred\nHow many shapes are there?\ttwo"
    assert shapes.parse_qa_pairs(text) == qas and shapes.parse_qa_pairs("") == []
    with pytest.raises(ValueError, match="not 'question<TAB>answer'"):
        shapes.parse_qa_pairs("What color is the circle? red")
    with pytest.raises(ValueError, match="tab or newline"):
        shapes.format_qa_pairs([("What\tcolor?", "red")])


def test_make_example_fields_balance_and_determinism():
    examples = [shapes.make_example(i) for i in range(600)]
    caption_kinds = collections.Counter(e["caption_kind"] for e in examples)
    question_kinds = collections.Counter(e["question_kind"] for e in examples)
    assert set(caption_kinds) == set(shapes.CAPTION_KINDS)
    assert min(caption_kinds.values()) > 60  # ~100 each
    assert set(question_kinds) == set(shapes.QUESTION_KINDS)
    exists = [e["answer"] for e in examples if e["question_kind"] == "exists"]
    assert 0.35 < np.mean([a == "yes" for a in exists]) < 0.65
    for e in examples[:50]:
        assert e["image"].dtype == np.uint8 and e["image"].shape == (64, 64, 3)
        assert shapes.parse_prompt(e["caption"]).kind == e["caption_kind"]
        assert shapes.question_kind(e["question"]) == e["question_kind"]
        assert len(e["answer"].split()) == 1
        # qa_pairs: every question of the image (the record's own among them), answered by the
        # detector-free ground truth questions_for computes from the scene.
        qas = shapes.parse_qa_pairs(e["qa_pairs"])
        assert (e["question"], e["answer"]) in qas and len(qas) == len(dict(qas)) >= 3
        assert {shapes.question_kind(q) for q, _ in qas} >= {"count", "exists"}
    a, b = shapes.make_example(123), shapes.make_example(123)
    np.testing.assert_array_equal(a.pop("image"), b.pop("image"))
    assert a == b
    c = shapes.make_example(124)
    assert not np.array_equal(c["image"], shapes.make_example(123)["image"])
    small = shapes.make_example(shapes.example_rng(0, "test", 5), image_size=32)
    assert small["image"].shape == (32, 32, 3)


def test_generation_prompts_split_and_balance():
    train = shapes.generation_prompts("train", 60, seed=0)
    test = shapes.generation_prompts("test", 60, seed=0)
    assert train == shapes.generation_prompts("train", 60, seed=0)
    assert train != test and test != shapes.generation_prompts("test", 60, seed=1)
    kinds = collections.Counter(shapes.parse_prompt(p).kind for p in test)
    assert kinds == {k: 10 for k in shapes.CAPTION_KINDS}
    with pytest.raises(ValueError, match="split"):
        shapes.generation_prompts("validation", 3)


@pytest.mark.parametrize("kind,objs", [
    ("single", [("red", "circle")]),
    ("two_objects", [("orange", "square"), ("blue", "triangle")]),
    ("left_of", [("green", "triangle"), ("green", "square")]),
    ("above", [("purple", "circle"), ("yellow", "circle")]),
    ("count_two", [("blue", "square")]),
    ("count_three", [("yellow", "triangle")]),
])
def test_parse_prompt_round_trip(kind, objs):
    prompt = shapes.format_prompt(kind, objs)
    spec = shapes.parse_prompt(prompt)
    assert spec.kind == kind
    n = {"count_two": 2, "count_three": 3}.get(kind)
    assert spec.objects == (tuple(objs) * n if n else tuple(objs))
    assert spec.exact_count == (n is not None)
    assert spec.relation == (kind if kind in ("left_of", "above") else None)
    # Case, spacing, a final full stop and "an" are tolerated.
    assert shapes.parse_prompt("  " + prompt.upper().replace(" ", "  ") + ".") == spec


def test_parse_prompt_accepts_an():
    assert shapes.parse_prompt("an orange circle").objects == (("orange", "circle"),)


@pytest.mark.parametrize("bad", [
    "", "a pink circle", "a red hexagon", "four red circles", "two red circle",
    "a red circle left of a blue square", "a red circle and", "red circle",
    "a red circle and a blue square and a green triangle",
])
def test_parse_prompt_errors(bad):
    with pytest.raises(ValueError, match="outside the shapes-world grammar"):
        shapes.parse_prompt(bad)


def test_parse_prompt_rejects_non_strings():
    with pytest.raises(ValueError, match="must be a str"):
        shapes.parse_prompt(None)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="too small"):
        shapes.sample_scene(0, image_size=8)
    with pytest.raises(ValueError, match="does not fit"):
        shapes.render(shapes.Scene((shapes.ShapeObject("red", "square", 2, 2, 6),)))
    with pytest.raises(ValueError, match="not a shapes-world question"):
        shapes.question_kind("Why is the sky blue?")


# ----------------------------------------------------------------------------- TFDS builder
def _by_index(source):
    return {int(source[j]["index"]): source[j] for j in range(len(source))}


def _assert_same(a, b):
    np.testing.assert_array_equal(a["image"], b["image"])
    for k in ("caption", "caption_kind", "question", "answer", "question_kind", "qa_pairs"):
        assert a[k] == b[k], k


def test_tfds_builder_round_trip(tmp_path):
    import grain
    from unimm_jax.data import shapes_tfds

    kw = dict(image_size=64, num_train=64, num_test=16, seed=3)
    builder = shapes_tfds.build_shapes_world(tmp_path / "a", **kw)
    assert builder.name == "shapes_world"
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["test"].num_examples == 16
    files = [p.name for p in (tmp_path / "a").rglob("*.array_record*")]
    assert files, "expected array_record files"

    for split, n in (("train", 64), ("test", 16)):
        source = shapes_tfds.shapes_data_source(tmp_path / "a", split, prepare=False, **kw)
        assert len(source) == n
        got = _by_index(source)
        assert sorted(got) == list(range(n))
        for i in (0, n // 2, n - 1):
            ex = got[i]
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (64, 64, 3)
            assert isinstance(ex["caption"], str)
            _assert_same(ex, shapes.make_example(shapes.example_rng(3, split, i)))

    # Same seed in another directory -> identical data; train and test differ.
    again = _by_index(shapes_tfds.shapes_data_source(tmp_path / "b", "test", **kw))
    first = _by_index(shapes_tfds.shapes_data_source(tmp_path / "a", "test", **kw))
    for i in range(16):
        _assert_same(first[i], again[i])
    train = _by_index(shapes_tfds.shapes_data_source(tmp_path / "a", "train", **kw))
    assert not np.array_equal(train[0]["image"], first[0]["image"])

    # Readable by Grain.
    ds = grain.MapDataset.source(
        shapes_tfds.shapes_data_source(tmp_path / "a", "train", **kw)).batch(8)
    assert ds[0]["image"].shape == (8, 64, 64, 3)


def test_tfds_missing_dataset_error(tmp_path):
    from unimm_jax.data import shapes_tfds

    with pytest.raises(FileNotFoundError, match="build_shapes_world"):
        shapes_tfds.shapes_data_source(tmp_path, "train", num_train=8, num_test=8,
                                       prepare=False)
