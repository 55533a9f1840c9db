"""The synthetic shapes world: the default dataset and the default generation benchmark.

Small scenes of 1-3 flat coloured shapes on a white background. Everything about a scene is
known exactly, so captions, question answers and GenEval-style generation checks
(`unimm_jax.evals.shapes_scorer`) are exact rather than judged by another model.

The spec (the scorer and the TFDS builder rely on it):

* Images are ``uint8 [S, S, 3]`` (``S = image_size``, default 64), white (255, 255, 255)
  background, rendered crisply (no anti-aliasing) so every object pixel is exactly its
  palette colour.
* Colours: `PALETTE`; shapes: circle, square (axis-aligned), triangle (isosceles, apex up).
* Every object has an integer centre ``(cx, cy)`` and integer half-extent ``r`` (6-11 px at
  64 px, scaled by ``S / 64``); it covers pixels inside its bounding box
  ``[cx - r, cx + r] x [cy - r, cy + r]`` (inclusive), which lies fully inside the image.
* Bounding boxes of different objects are separated by at least `MIN_GAP` background pixels
  along at least one axis, so connected components never merge.
* Captions / generation prompts, by kind::

      single       a {color} {shape}
      two_objects  a {c1} {s1} and a {c2} {s2}
      left_of      a {c1} {s1} to the left of a {c2} {s2}
      above        a {c1} {s1} above a {c2} {s2}
      count_two    two {color} {shape}s
      count_three  three {color} {shape}s

  (The article is always "a", "a orange circle" included: the grammar is kept literal so that
  prompts are trivially machine-generated and parsed; `parse_prompt` also accepts "an".)
  Spatial relations are defined by object centres; a scene made for a relation prompt keeps
  the centres at least ``r1 + r2`` apart along that axis so the relation is unambiguous.
* Questions with one-word answers, by kind::

      color   What color is the {shape}?        (only if that shape is unique in the scene)
      shape   What shape is the {color} object? (only if that colour is unique in the scene)
      count   How many shapes are there?        one / two / three
      exists  Is there a {color} {shape}?       yes / no (balanced)

Train/test split choice: the prompt space is tiny (~1k distinct prompts) and every
colour-shape combination is needed to learn the vocabulary, so no combinations are held out.
Splits differ in their random streams: test examples and test generation prompts come from
seeds disjoint from the training ones, so the test split holds new scenes (new sizes,
positions and prompt instances), while many prompt *texts* necessarily also occur in train.
This measures fitting the distribution, not compositional generalisation.

All randomness comes from an explicit ``numpy.random.Generator``; same seed -> same output.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable, Sequence, Union

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "purple": (145, 30, 180),
    "orange": (245, 130, 48),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
CAPTION_KINDS: tuple[str, ...] = (
    "single", "two_objects", "left_of", "above", "count_two", "count_three")
QUESTION_KINDS: tuple[str, ...] = ("color", "shape", "count", "exists")
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three")
MIN_GAP = 2  # background pixels between bounding boxes (along at least one axis)
MAX_OBJECTS = 3
_BASE_SIZE = 64
_BASE_HALF_EXTENT = (6, 11)

# Seed-stream tags: keep example streams and prompt streams disjoint for the same user seed.
_EXAMPLE_TAG = 0x5EED
_PROMPT_TAG = 0x9E0
SPLIT_CODES = {"train": 0, "test": 1}

SeedLike = Union[int, Sequence[int], np.random.Generator]


# --------------------------------------------------------------------------- data classes
@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One flat shape: colour and shape names, integer centre (x right, y down), half-extent."""

    color: str
    shape: str
    cx: int
    cy: int
    r: int

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive pixel bounding box ``(x0, y0, x1, y1)``."""
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """A list of 1-3 objects on a white ``image_size`` x ``image_size`` canvas."""

    objects: tuple[ShapeObject, ...]
    image_size: int = _BASE_SIZE

    def count(self, color: str | None = None, shape: str | None = None) -> int:
        """How many objects match the given colour and/or shape (None matches anything)."""
        return sum((color is None or o.color == color) and (shape is None or o.shape == shape)
                   for o in self.objects)


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """A parsed generation prompt.

    objects: every required object instance as ``(color, shape)``, in prompt order (a count
      prompt repeats its one combination N times).
    relation: "left_of" / "above" (``objects[0]`` REL ``objects[1]``, by centres) or None.
    exact_count: count prompts require exactly ``len(objects)`` of that colour-shape; other
      kinds require at least the listed objects.
    """

    kind: str
    objects: tuple[tuple[str, str], ...]
    relation: str | None = None
    exact_count: bool = False


# --------------------------------------------------------------------------- helpers
def as_rng(seed_or_rng: SeedLike) -> np.random.Generator:
    """An int, a sequence of ints (SeedSequence entropy) or a Generator -> a Generator."""
    if isinstance(seed_or_rng, np.random.Generator):
        return seed_or_rng
    return np.random.default_rng(seed_or_rng)


def half_extent_range(image_size: int) -> tuple[int, int]:
    """Inclusive ``(min, max)`` half-extent in pixels: 6-11 at 64 px, scaled by size / 64."""
    if image_size < 16:
        raise ValueError(f"image_size={image_size} is too small for the shapes world; use >= 16.")
    scale = image_size / _BASE_SIZE
    lo = max(2, int(np.floor(_BASE_HALF_EXTENT[0] * scale + 0.5)))
    hi = max(lo, int(np.floor(_BASE_HALF_EXTENT[1] * scale + 0.5)))
    return lo, hi


def bbox_gap(a: ShapeObject, b: ShapeObject) -> int:
    """Background pixels between two bounding boxes along their best-separated axis.

    Negative or zero when the boxes touch or overlap on both axes.
    """
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    gap_x = max(bx0 - ax1, ax0 - bx1) - 1
    gap_y = max(by0 - ay1, ay0 - by1) - 1
    return max(gap_x, gap_y)


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str, margin: bool = True) -> bool:
    """Whether ``a`` is left of / above ``b`` by centres (with the ``ra + rb`` margin if asked)."""
    need = (a.r + b.r) if margin else 1
    if relation == "left_of":
        return b.cx - a.cx >= need
    if relation == "above":
        return b.cy - a.cy >= need
    raise ValueError(f"unknown relation {relation!r}; expected 'left_of' or 'above'.")


def _plural(shape: str) -> str:
    return shape + "s"


# --------------------------------------------------------------------------- rendering
def object_mask(obj: ShapeObject) -> np.ndarray:
    """Boolean ``[2r+1, 2r+1]`` mask of ``obj`` within its bounding box."""
    r = obj.r
    d = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(d, d, indexing="ij")
    if obj.shape == "square":
        return np.ones((2 * r + 1, 2 * r + 1), bool)
    if obj.shape == "circle":
        # (r + 0.5)^2 so the circle touches all four box edges with more than one pixel.
        return dx * dx + dy * dy <= (r + 0.5) ** 2
    if obj.shape == "triangle":
        # Apex row (top) is 1 px wide; the base row (bottom) spans the full 2r + 1.
        row = dy + r  # 0 at the top
        return 2 * np.abs(dx) <= row
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}.")


def render(scene: Scene) -> np.ndarray:
    """Rasterise ``scene`` -> ``uint8 [S, S, 3]``; object pixels hold exact palette colours."""
    s = scene.image_size
    img = np.empty((s, s, 3), np.uint8)
    img[...] = BACKGROUND
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        if x0 < 0 or y0 < 0 or x1 >= s or y1 >= s:
            raise ValueError(f"{obj} does not fit inside a {s}x{s} image.")
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour {obj.color!r}; expected one of {COLORS}.")
        region = img[y0:y1 + 1, x0:x1 + 1]
        region[object_mask(obj)] = PALETTE[obj.color]
    return img


# --------------------------------------------------------------------------- sampling
def _place(objects: Sequence[tuple[str, str]], rng: np.random.Generator, image_size: int,
           relation: str | None = None, max_tries: int = 1000) -> Scene:
    """Random sizes and positions for ``objects`` obeying bounds, gaps and ``relation``."""
    lo, hi = half_extent_range(image_size)
    for _ in range(max_tries):
        placed: list[ShapeObject] = []
        for k, (color, shape) in enumerate(objects):
            r = int(rng.integers(lo, hi + 1))
            for _ in range(50):
                cx, cy = (int(v) for v in rng.integers(r, image_size - r, size=2))
                obj = ShapeObject(color, shape, cx, cy, r)
                if all(bbox_gap(obj, p) >= MIN_GAP for p in placed) and (
                        relation is None or k != 1 or relation_holds(placed[0], obj, relation)):
                    placed.append(obj)
                    break
            else:
                break  # no room for this object: start the scene again
        if len(placed) == len(objects):
            return Scene(tuple(placed), image_size)
    raise RuntimeError(f"could not place {list(objects)} in a {image_size}px image.")


def sample_scene(rng: SeedLike, image_size: int = _BASE_SIZE) -> Scene:
    """A random scene: 1-3 objects (uniform), each of a uniform colour and shape."""
    rng = as_rng(rng)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    objects = [(COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))])
               for _ in range(n)]
    return _place(objects, rng, image_size)


# --------------------------------------------------------------------------- prompts
def format_prompt(kind: str, objects: Sequence[tuple[str, str]]) -> str:
    """The prompt text for ``kind``; ``objects`` holds 1 (single, count_*) or 2 (color, shape)."""
    (c1, s1), *rest = objects
    if kind == "single":
        return f"a {c1} {s1}"
    if kind == "count_two":
        return f"two {c1} {_plural(s1)}"
    if kind == "count_three":
        return f"three {c1} {_plural(s1)}"
    (c2, s2), = rest
    if kind == "two_objects":
        return f"a {c1} {s1} and a {c2} {s2}"
    if kind == "left_of":
        return f"a {c1} {s1} to the left of a {c2} {s2}"
    if kind == "above":
        return f"a {c1} {s1} above a {c2} {s2}"
    raise ValueError(f"unknown prompt kind {kind!r}; expected one of {CAPTION_KINDS}.")


_C = "(" + "|".join(COLORS) + ")"
_S = "(" + "|".join(SHAPES) + ")"
_SP = "(" + "|".join(_plural(s) for s in SHAPES) + ")"
_A = "an?"
_PATTERNS = [
    ("single", re.compile(rf"{_A} {_C} {_S}")),
    ("two_objects", re.compile(rf"{_A} {_C} {_S} and {_A} {_C} {_S}")),
    ("left_of", re.compile(rf"{_A} {_C} {_S} to the left of {_A} {_C} {_S}")),
    ("above", re.compile(rf"{_A} {_C} {_S} above {_A} {_C} {_S}")),
    ("count_two", re.compile(rf"two {_C} {_SP}")),
    ("count_three", re.compile(rf"three {_C} {_SP}")),
]
_GRAMMAR_HELP = ("expected one of: 'a {color} {shape}', 'a {c1} {s1} and a {c2} {s2}', "
                 "'a {c1} {s1} to the left of a {c2} {s2}', 'a {c1} {s1} above a {c2} {s2}', "
                 "'two {color} {shape}s', 'three {color} {shape}s' with colors "
                 f"{', '.join(COLORS)} and shapes {', '.join(SHAPES)}")


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a generation prompt / caption (case, extra spaces and a final '.' are ignored).

    Raises ValueError naming the prompt and the grammar when it is outside the grammar.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}.")
    text = _normalise(prompt)
    for kind, pattern in _PATTERNS:
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if kind in ("count_two", "count_three"):
            n = 2 if kind == "count_two" else 3
            return PromptSpec(kind, ((g[0], g[1][:-1]),) * n, None, exact_count=True)
        objs = tuple(zip(g[0::2], g[1::2]))
        relation = kind if kind in ("left_of", "above") else None
        return PromptSpec(kind, objs, relation)
    raise ValueError(f"prompt {prompt!r} is outside the shapes-world grammar; {_GRAMMAR_HELP}.")


def sample_prompt(rng: SeedLike, kind: str | None = None) -> str:
    """A random prompt of ``kind`` (uniform over `CAPTION_KINDS` if None).

    Two-object kinds always name two different colour-shape combinations.
    """
    rng = as_rng(rng)
    if kind is None:
        kind = CAPTION_KINDS[rng.integers(len(CAPTION_KINDS))]
    combos = [(c, s) for c in COLORS for s in SHAPES]
    if kind in ("single", "count_two", "count_three"):
        objs = [combos[rng.integers(len(combos))]]
    else:
        i, j = rng.choice(len(combos), size=2, replace=False)
        objs = [combos[i], combos[j]]
    return format_prompt(kind, objs)


def scene_for_prompt(prompt: str | PromptSpec, rng: SeedLike,
                     image_size: int = _BASE_SIZE) -> Scene:
    """A random scene holding exactly the objects ``prompt`` names, and nothing else.

    For left_of / above the centres are at least ``r1 + r2`` apart along that axis.
    """
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    return _place(spec.objects, as_rng(rng), image_size, spec.relation)


def generation_prompts(split: str, n: int, seed: int = 0) -> list[str]:
    """``n`` deterministic generation prompts for ``split`` ("train" / "test").

    Kinds cycle round-robin through `CAPTION_KINDS`, so every kind gets ``n // 6`` or one more.
    Test prompts come from a random stream disjoint from train's (see the module docstring).
    """
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}.")
    rng = np.random.default_rng([_PROMPT_TAG, seed, SPLIT_CODES[split]])
    return [sample_prompt(rng, CAPTION_KINDS[i % len(CAPTION_KINDS)]) for i in range(n)]


# --------------------------------------------------------------------------- captions
def captions_for(scene: Scene) -> list[tuple[str, str]]:
    """All true captions of ``scene`` as ``(caption, kind)``, deduplicated, in a fixed order.

    True under the scorer's reading: single / two_objects need the objects present; count
    kinds need exactly that many of the combination; left_of / above are only listed when
    every instance of the first combination is left of / above every instance of the second
    by the ``r1 + r2`` centre margin (so the caption is unambiguous).
    """
    objs = scene.objects
    combos = list(dict.fromkeys((o.color, o.shape) for o in objs))
    out: list[tuple[str, str]] = [(format_prompt("single", [c]), "single") for c in combos]
    pairs = [(a, b) for a in combos for b in combos if a != b]
    out += [(format_prompt("two_objects", [a, b]), "two_objects") for a, b in pairs]
    for relation in ("left_of", "above"):
        for a, b in pairs:
            inst_a = [o for o in objs if (o.color, o.shape) == a]
            inst_b = [o for o in objs if (o.color, o.shape) == b]
            if all(relation_holds(p, q, relation) for p in inst_a for q in inst_b):
                out.append((format_prompt(relation, [a, b]), relation))
    for c in combos:
        n = scene.count(*c)
        if n in (2, 3):
            kind = "count_two" if n == 2 else "count_three"
            out.append((format_prompt(kind, [c]), kind))
    return out


# --------------------------------------------------------------------------- questions
_QUESTION_PATTERNS = [
    ("color", re.compile(r"what colou?r is the \w+\??")),
    ("shape", re.compile(r"what shape is the \w+ object\??")),
    ("count", re.compile(r"how many shapes are there\??")),
    ("exists", re.compile(r"is there an? \w+ \w+\??")),
]


def question_kind(question: str) -> str:
    """"color" / "shape" / "count" / "exists" for a shapes-world question, else ValueError."""
    text = _normalise(question)
    for kind, pattern in _QUESTION_PATTERNS:
        if pattern.fullmatch(text):
            return kind
    raise ValueError(f"question {question!r} is not a shapes-world question; expected e.g. "
                     "'What color is the circle?', 'What shape is the red object?', "
                     "'How many shapes are there?' or 'Is there a red circle?'.")


def questions_for(scene: Scene, rng: SeedLike) -> list[tuple[str, str]]:
    """Every applicable question with its one-word answer, as ``(question, answer)``.

    Colour questions for each shape unique in the scene, shape questions for each colour
    unique in the scene, one count question, and exactly one "yes" and one "no" existence
    question (so drawing uniformly among existence questions is balanced). ``rng`` picks the
    existence questions; half the "no" questions are near misses that share a colour or a
    shape with an object in the scene, so they cannot be answered from one word alone.
    """
    rng = as_rng(rng)
    objs = scene.objects
    out: list[tuple[str, str]] = []
    for shape in SHAPES:
        match = [o for o in objs if o.shape == shape]
        if len(match) == 1:
            out.append((f"What color is the {shape}?", match[0].color))
    for color in COLORS:
        match = [o for o in objs if o.color == color]
        if len(match) == 1:
            out.append((f"What shape is the {color} object?", match[0].shape))
    out.append(("How many shapes are there?", NUMBER_WORDS[len(objs)]))
    present = sorted({(o.color, o.shape) for o in objs})
    c, s = present[rng.integers(len(present))]
    out.append((f"Is there a {c} {s}?", "yes"))
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    near = [(c, s) for c, s in absent if any(c == p[0] or s == p[1] for p in present)]
    pool = near if (near and rng.random() < 0.5) else absent
    c, s = pool[rng.integers(len(pool))]
    out.append((f"Is there a {c} {s}?", "no"))
    return out


def answerable_from(turns: Sequence[tuple[str, str]], question: str) -> bool:
    """Whether ``question``'s answer follows from the earlier ``(question, answer)`` ``turns``
    alone, without the image, under this world's rules (a colour question is only asked of a
    shape unique in the scene, a shape question of a colour unique in the scene).

    A dialogue that asks "What color is the square?" (red) and then "Is there a red square?"
    trains its second answer as a copy of the first rather than a reading of the image;
    training dialogues skip such questions.
    """
    seen: set[tuple[str, str]] = set()  # (colour, shape) pairs the answers showed present
    shape_color: dict[str, str] = {}  # a unique shape's colour, from a colour question
    color_shape: dict[str, str] = {}  # a unique colour's shape, from a shape question
    for q, a in turns:
        words, a = _normalise(q).rstrip("?").split(), _normalise(a)
        kind = question_kind(q)
        if kind == "color":
            shape_color[words[-1]] = a
            seen.add((a, words[-1]))
        elif kind == "shape":
            color_shape[words[-2]] = a
            seen.add((words[-2], a))
        elif kind == "exists" and a == "yes":
            seen.add((words[-2], words[-1]))
    words = _normalise(question).rstrip("?").split()
    kind = question_kind(question)
    if kind == "color":
        return any(s == words[-1] for _, s in seen)
    if kind == "shape":
        return any(c == words[-2] for c, _ in seen)
    if kind == "exists":
        c, s = words[-2], words[-1]
        return (c, s) in seen or s in shape_color or c in color_shape
    return len(seen) >= MAX_OBJECTS  # count: every object already named


# --------------------------------------------------------------------------- examples
def make_example(seed_or_rng: SeedLike, image_size: int = _BASE_SIZE) -> dict:
    """One training example.

    The caption kind is uniform over `CAPTION_KINDS`; the scene holds exactly the objects
    the caption names (so the caption completely describes the image, which is what a
    text-to-image model should learn). The question kind is uniform over the kinds that
    apply to the scene, then the question uniform within the kind.

    Returns dict(image=uint8 [S,S,3], caption=str, caption_kind=str, question=str,
    answer=str, question_kind=str, qa_pairs=str): ``qa_pairs`` is every question of
    `questions_for` with its answer (`format_qa_pairs`), for multi-turn training dialogues.
    """
    rng = as_rng(seed_or_rng)
    kind = CAPTION_KINDS[rng.integers(len(CAPTION_KINDS))]
    caption = sample_prompt(rng, kind)
    scene = scene_for_prompt(caption, rng, image_size)
    qas = questions_for(scene, rng)
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for q, a in qas:
        by_kind.setdefault(question_kind(q), []).append((q, a))
    q_kinds = [k for k in QUESTION_KINDS if k in by_kind]
    q_kind = q_kinds[rng.integers(len(q_kinds))]
    question, answer = by_kind[q_kind][rng.integers(len(by_kind[q_kind]))]
    return dict(image=render(scene), caption=caption, caption_kind=kind, question=question,
                answer=answer, question_kind=q_kind, qa_pairs=format_qa_pairs(qas))


def format_qa_pairs(qas: Sequence[tuple[str, str]]) -> str:
    """``[(question, answer), ...]`` -> one string, a ``question<TAB>answer`` line per pair."""
    for q, a in qas:
        if "\t" in q + a or "\n" in q + a:
            raise ValueError(f"a question / answer holds a tab or newline: {(q, a)!r}.")
    return "\n".join(f"{q}\t{a}" for q, a in qas)


def parse_qa_pairs(text: str) -> list[tuple[str, str]]:
    """Inverse of `format_qa_pairs`; ValueError naming the line that is not ``question<TAB>answer``."""
    out = []
    for line in text.split("\n") if text else []:
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ValueError(f"qa_pairs line {line!r} is not 'question<TAB>answer'.")
        out.append((parts[0], parts[1]))
    return out


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator for example ``index`` of ``split``: independent of order and workers."""
    if split not in SPLIT_CODES:
        raise ValueError(f"split must be one of {tuple(SPLIT_CODES)}, got {split!r}.")
    return np.random.default_rng([_EXAMPLE_TAG, seed, SPLIT_CODES[split], index])


def iter_examples(split: str, num: int, seed: int = 0, image_size: int = _BASE_SIZE
                  ) -> Iterable[tuple[int, dict]]:
    """``(index, make_example(example_rng(seed, split, index)))`` for index < ``num``."""
    for i in range(num):
        yield i, make_example(example_rng(seed, split, i), image_size)
