"""The default job's LLM-stage work for the step benchmarks (host_malloc.py, optimizer_step.py):
the config, and real packed batches of a small shapes world built into a temp dir."""
from __future__ import annotations

import tempfile

from unimm_jax.config_files import load_config
from unimm_jax.train import loop, vq_trainer


def default_job_batches(config_path: str, num_batches: int):
    """(config, workdir, batches): `num_batches` host batches of the config's LLM stage (its stage,
    mixture and batch shape, e.g. 16 x 256 for configs/shapes_tiny.py) from an 800-image shapes
    world in a fresh temp workdir, generation images encoded by a randomly initialised VQ (a step's
    cost does not depend on the VQ's weights)."""
    config = load_config(config_path)
    work = tempfile.mkdtemp()
    config.data.num_train, config.data.num_test = 800, 50
    tokenizer, tokens = loop._shapes_setup(config, work)
    encoder = loop._vq_encoder(config.model, vq_trainer.init_vq(config.model.vq, 0))
    data = loop.make_data_iterator(config, image_encoder=encoder, tokenizer=tokenizer, tokens=tokens)
    return config, work, [next(data) for _ in range(num_batches)]
