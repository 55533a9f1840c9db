"""Packed rows through the Janus LLM: every segment sees only itself (attention honours
segment_ids/positions), so its logits equal those of the example run alone, unpacked."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm_jax.data import conversation, packing, shapes_vocab
from unimm_jax.models.janus import Janus
from unimm_jax.models.janus_config import num_image_tokens, tiny_janus_config


def _logits(module, ids, is_img, segment_ids, positions):
    """(text logits [B,T,V], code logits [B,T,K]) with VQ codes embedded where is_img."""
    text = module.llm.embed_tokens(jnp.where(is_img, 0, ids))
    codes = module.image_token_embeds(jnp.where(is_img, ids, 0)).astype(text.dtype)
    hidden = module.run_llm(jnp.where(is_img[..., None], codes, text), None, segment_ids, positions)
    return module.llm.logits(hidden), module.gen_head(hidden)


def test_packed_segments_match_examples_run_alone():
    tok = shapes_vocab.build_shapes_tokenizer()
    ids = shapes_vocab.shapes_token_ids(tok)
    m = tiny_janus_config(**ids)
    n = num_image_tokens(m)
    rng = np.random.default_rng(0)
    examples = [
        conversation.text_example(tok, ids, "a red circle"),
        conversation.generation_example(tok, ids, "two blue squares", rng.integers(0, m.vq.codebook_size, n)),
        conversation.text_example(tok, ids, "a green triangle above a yellow square"),
        conversation.generation_example(tok, ids, "a purple circle", rng.integers(0, m.vq.codebook_size, n),
                                        cfg_drop=True),
        conversation.text_example(tok, ids, "three orange triangles"),
        conversation.text_example(tok, ids, "a red circle to the left of a blue square"),
    ]
    (batch,) = packing.pack_examples(examples, num_rows=2, seq_len=96, max_images_per_row=1,
                                     image_shape=(m.vision.image_size,) * 2 + (3,), pad_id=ids["pad_token_id"])
    assert (batch["segment_ids"].max(1) >= 2).all()  # each row really holds several examples
    model = Janus(m)
    feats = ("input_ids", "input_is_image", "segment_ids", "positions")
    # Rows 0-1: the packed batch; rows 2+: each example alone, padded to seq_len as segment 1
    # (one array, so the model compiles once).
    rows = {k: np.zeros((2 + len(examples), 96), batch[k].dtype) for k in feats}
    for k in feats:
        rows[k][:2] = batch[k]
    for i, ex in enumerate(examples):
        length = len(ex["input_ids"])
        rows["input_ids"][2 + i, :length] = ex["input_ids"]
        rows["input_is_image"][2 + i, :length] = ex["input_is_image"]
        rows["segment_ids"][2 + i, :length] = 1
        rows["positions"][2 + i, :length] = np.arange(length)
    args = tuple(jnp.asarray(rows[k]) for k in feats)
    # Any weights will do for an equivalence, so draw them with numpy from the parameter shapes
    # (compiling the model's initialisers costs far more than this whole test).
    shapes = nn.unbox(jax.eval_shape(lambda key: model.init(key, *args, method=_logits), jax.random.key(0)))
    params = jax.tree.map(lambda x: rng.normal(0.0, 0.1, x.shape).astype(x.dtype), shapes["params"])
    text, code = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=_logits))(params, *args)
    checked = 0
    for i, ex in enumerate(examples):
        length = len(ex["input_ids"])
        # Find the example in the packed rows by its tokens.
        for r in range(2):
            for sid in np.unique(batch["segment_ids"][r][batch["segment_ids"][r] > 0]):
                where = np.flatnonzero(batch["segment_ids"][r] == sid)
                if len(where) == length and np.array_equal(batch["input_ids"][r, where], ex["input_ids"]):
                    np.testing.assert_allclose(text[r, where], text[2 + i, :length], atol=2e-5, rtol=2e-5)
                    np.testing.assert_allclose(code[r, where], code[2 + i, :length], atol=2e-5, rtol=2e-5)
                    checked += 1
    assert checked == len(examples)
