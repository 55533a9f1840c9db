"""TFDS builder for the synthetic shapes world (`unimm_jax.data.shapes`), stored as array_record.

Nothing is downloaded: examples are generated from the config's seed, example ``i`` of a split
from its own random stream (`shapes.example_rng`), so the data is identical whatever the
order or machine. Features per example:

  image         uint8 [S, S, 3]   (zlib-compressed raw tensor, so no TensorFlow is needed to
                                   write or read it; a PNG `Image` feature would need TF)
  caption       str               a generation prompt that completely describes the image
  caption_kind  str               one of `shapes.CAPTION_KINDS`
  question      str, answer str   a question with a one-word answer
  question_kind str               one of `shapes.QUESTION_KINDS`
  qa_pairs      str               every question about the image with its answer, one
                                  ``question<TAB>answer`` line each (`shapes.parse_qa_pairs`)
  index         int64             the example's index in the generation order of its split

TFDS stores examples in a shuffled (key-hash) order, so random-access index ``j`` of the data
source is generally not example ``j``; the ``index`` feature maps back.

Typical use::

    build_shapes_world("/data/tfds", image_size=64, num_train=50_000, num_test=1_000)
    source = shapes_data_source("/data/tfds", "train", image_size=64, ...)
    ds = grain.MapDataset.source(source).shuffle(seed=0).batch(32)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from unimm_jax.data import shapes

DEFAULT_NUM_TRAIN = 50_000
DEFAULT_NUM_TEST = 1_000


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """Size and seed of one shapes-world dataset; the name encodes them (see `config_name`)."""

    image_size: int = 64
    num_train: int = DEFAULT_NUM_TRAIN
    num_test: int = DEFAULT_NUM_TEST
    seed: int = 0


def config_name(image_size: int, num_train: int, num_test: int, seed: int) -> str:
    """Directory-safe config name, e.g. ``s64_train50000_test1000_seed0``."""
    return f"s{image_size}_train{num_train}_test{num_test}_seed{seed}"


def make_config(image_size: int = 64, num_train: int = DEFAULT_NUM_TRAIN,
                num_test: int = DEFAULT_NUM_TEST, seed: int = 0) -> ShapesWorldConfig:
    """A config whose name encodes all its fields, so different data never share a directory."""
    for k, v in dict(num_train=num_train, num_test=num_test).items():
        if v < 1:
            raise ValueError(f"{k} must be >= 1, got {v}.")
    shapes.half_extent_range(image_size)  # validates image_size with a clear message
    return ShapesWorldConfig(
        name=config_name(image_size, num_train, num_test, seed),
        description=f"{image_size}px shapes world, {num_train} train / {num_test} test, "
                    f"seed {seed}.",
        image_size=image_size, num_train=num_train, num_test=num_test, seed=seed)


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Synthetic scenes of coloured shapes with captions and one-word QA (registered as
    "shapes_world")."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "Initial release.",
                     "1.1.0": "qa_pairs: every question about the image (multi-turn training); the other "
                              "features are unchanged."}
    BUILDER_CONFIGS = [make_config(), make_config(image_size=32, num_train=10_000, num_test=500)]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default probes `importlib_resources`, which it only declares for Python < 3.9,
        # so on newer Pythons without that package preparing fails; the answer is this file.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        s = self.builder_config.image_size
        # Built directly (not dataset_info_from_configs) because that reads metadata files
        # from a TFDS-style package directory that this module does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Tensor(shape=(s, s, 3), dtype=np.uint8,
                                              encoding=tfds.features.Encoding.ZLIB),
                "caption": tfds.features.Text(),
                "caption_kind": tfds.features.Text(),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "question_kind": tfds.features.Text(),
                "qa_pairs": tfds.features.Text(),
                "index": np.int64,
            }),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        c = self.builder_config
        return {"train": self._generate_examples("train", c.num_train),
                "test": self._generate_examples("test", c.num_test)}

    def _generate_examples(self, split: str, num: int):
        c = self.builder_config
        for i, ex in shapes.iter_examples(split, num, seed=c.seed, image_size=c.image_size):
            yield i, dict(ex, index=i)


def shapes_world_builder(data_dir: str, image_size: int = 64,
                         num_train: int = DEFAULT_NUM_TRAIN, num_test: int = DEFAULT_NUM_TEST,
                         seed: int = 0) -> ShapesWorld:
    """The (possibly not yet prepared) builder for these settings, writing array_record."""
    config = make_config(image_size, num_train, num_test, seed)
    if config.name in ShapesWorld.builder_configs:
        config = config.name  # a predefined config: by name, which TFDS does not warn about
    return ShapesWorld(data_dir=str(data_dir), file_format="array_record", config=config)


def build_shapes_world(data_dir: str, image_size: int = 64,
                       num_train: int = DEFAULT_NUM_TRAIN, num_test: int = DEFAULT_NUM_TEST,
                       seed: int = 0) -> ShapesWorld:
    """Generate the dataset under ``data_dir`` (a no-op when already there); return the builder.

    Files land in ``data_dir/shapes_world/<config_name>/<VERSION>/``.
    """
    builder = shapes_world_builder(data_dir, image_size, num_train, num_test, seed)
    builder.download_and_prepare()
    return builder


class ShapesDataSource:
    """Grain-compatible random-access source: ``len(src)``, ``src[j]`` -> dict of numpy/str.

    Wraps the TFDS array_record data source and decodes the text features (which TFDS
    returns as bytes) to ``str``. Record ``j`` is a dict with image uint8 [S, S, 3],
    caption / caption_kind / question / answer / question_kind / qa_pairs str and index int64.
    """

    _TEXT = ("caption", "caption_kind", "question", "answer", "question_kind", "qa_pairs")

    def __init__(self, tfds_source):
        self._source = tfds_source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, j: int) -> dict:
        ex = dict(self._source[j])
        for k in self._TEXT:
            if isinstance(ex[k], bytes):
                ex[k] = ex[k].decode("utf-8")
        return ex

    def __repr__(self) -> str:
        return f"ShapesDataSource({self._source!r})"


def shapes_data_source(data_dir: str, split: str, image_size: int = 64,
                       num_train: int = DEFAULT_NUM_TRAIN, num_test: int = DEFAULT_NUM_TEST,
                       seed: int = 0, prepare: bool = True) -> ShapesDataSource:
    """Random-access source for ``split`` ("train" / "test", or any TFDS split spec like
    "train[:10%]"), for `grain.MapDataset.source`. Generates the data first if it is missing
    and ``prepare`` is True; otherwise a missing dataset raises FileNotFoundError with the fix.
    """
    builder = shapes_world_builder(data_dir, image_size, num_train, num_test, seed)
    if not builder.is_prepared():
        if not prepare:
            raise FileNotFoundError(
                f"shapes_world config {builder.builder_config.name!r} is not prepared under "
                f"{data_dir!r}; call build_shapes_world({str(data_dir)!r}, image_size="
                f"{image_size}, num_train={num_train}, num_test={num_test}, seed={seed}) or "
                "pass prepare=True.")
        builder.download_and_prepare()
    return ShapesDataSource(builder.as_data_source(split=split))
