"""The training batch contract between the Grain pipeline (data/pipeline.py) and the trainer.

Every batch is a dict of numpy arrays; B = per-process batch, T = config.data.seq_len,
M = config.data.max_images_per_row, H = W = the model's image size. Rows are packed: several
examples share a row, told apart by `segment_ids`; attention never crosses segments.

  input_ids        int32 [B, T]  what is fed at t: a text id, the image_token_id placeholder of an
                                 understanding image, or a VQ code (where input_is_image)
  input_is_image   bool  [B, T]  input at t is a VQ code: embedded by gen_embed -> gen_aligner
  target_ids       int32 [B, T]  the token to predict from position t (text id or VQ code)
  target_is_image  bool  [B, T]  target at t is a VQ code: scored by gen_head, else lm_head
  loss_mask        float32 [B,T] 1 on trained targets (assistant answer + EOS, caption text,
                                 generated image codes), 0 elsewhere (prompts, padding)
  task_ids         int32 [B, T]  TASKS index of the example a token belongs to (per-task losses)
  segment_ids      int32 [B, T]  1, 2, ... per packed example; 0 = padding
  positions        int32 [B, T]  RoPE positions, restarting at 0 in each segment
  pixel_values     float32 [B, M, H, W, 3] understanding images in [-1, 1], in the order their
                                 placeholder blocks appear in the row; unused slots are zeros
  image_valid      bool  [B, M]  which pixel_values slots hold an image
"""
from __future__ import annotations

import numpy as np

TASKS = ("understanding", "text", "generation")

FEATURES = {
    "input_ids": (np.int32, 2),
    "input_is_image": (np.bool_, 2),
    "target_ids": (np.int32, 2),
    "target_is_image": (np.bool_, 2),
    "loss_mask": (np.float32, 2),
    "task_ids": (np.int32, 2),
    "segment_ids": (np.int32, 2),
    "positions": (np.int32, 2),
    "pixel_values": (np.float32, 5),
    "image_valid": (np.bool_, 2),
}


def check_batch(batch: dict) -> None:
    """Raises ValueError naming the feature when a batch breaks the contract above."""
    missing = sorted(set(FEATURES) - set(batch))
    if missing:
        raise ValueError(f"batch is missing features {missing}; the pipeline must emit all of {sorted(FEATURES)}.")
    b, t = batch["input_ids"].shape
    for name, (dtype, ndim) in FEATURES.items():
        x = np.asarray(batch[name])
        if x.dtype != dtype or x.ndim != ndim:
            raise ValueError(f"batch[{name!r}] is {x.dtype}{list(x.shape)}; expected {np.dtype(dtype)} with {ndim} dims.")
        if ndim == 2 and name != "image_valid" and x.shape != (b, t):
            raise ValueError(f"batch[{name!r}] has shape {x.shape}; expected {(b, t)} like input_ids.")
    if batch["pixel_values"].shape[:2] != batch["image_valid"].shape:
        raise ValueError(
            f"pixel_values {batch['pixel_values'].shape} and image_valid {batch['image_valid'].shape} disagree on [B, M]."
        )
