"""unimm-generate / unimm-chat end to end on a tiny checkpoint, image I/O helpers, bad input."""
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

import unimm_jax as uj  # noqa: E402
from hf_janus import save_hf_model  # noqa: E402
from sample_models import make_varied_hf_model  # noqa: E402
from unimm_jax.cli import chat as chat_cli  # noqa: E402
from unimm_jax.cli import generate as gen_cli  # noqa: E402
from unimm_jax.convert.safetensors_io import CheckpointError  # noqa: E402
from unimm_jax.data.chat_format import generation_prompt_ids, understanding_prompt_ids  # noqa: E402
from unimm_jax.data.text_tokenizer import load_text_tokenizer  # noqa: E402
from unimm_jax.sample.images import load_image, make_grid, preprocess_image, save_images, to_uint8  # noqa: E402


def write_tokenizer(path):
    """A word-level tokenizer whose ids fit the tiny model's vocabulary, with Janus' special tokens
    at the tiny model's ids (the checkpoint reader takes BOI/EOI/... ids from it)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words = ["a", "red", "circle", "what", "is", "this", "?", "<|User|>:", "<|Assistant|>:"]
    vocab = {"[UNK]": 0, **{w: 10 + i for i, w in enumerate(words)}}
    vocab.update({f"w{i}": i for i in range(10 + len(words), 500)})
    special = {"<\uff5cbegin\u2581of\u2581sentence\uff5c>": 1, "<\uff5cend\u2581of\u2581sentence\uff5c>": 2,
               "<image_placeholder>": 500, "<begin_of_image>": 501, "<end_of_image>": 502, "<\uff5c\u2581pad\u2581\uff5c>": 503}
    vocab.update(special)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(s, special=True) for s in sorted(special, key=special.get)])
    tok.save(os.path.join(path, "tokenizer.json"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    hf = make_varied_hf_model()
    path = str(save_hf_model(hf, tmp_path_factory.mktemp("hf")))
    write_tokenizer(path)
    return hf, path


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = str(tmp_path_factory.mktemp("img") / "pic.png")
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_preprocess_matches_transformers_processor(picture):
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    proc = JanusImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    with Image.open(picture) as img:
        ref = proc(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = preprocess_image(img, 32)
    assert got.shape == (32, 32, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5)
    assert np.allclose(got[0], 127 / 127.5 - 1)  # padded rows are the (127,127,127) background
    with Image.open(picture) as img:  # RGBA / grayscale become RGB
        assert preprocess_image(img.convert("LA"), 32).shape == (32, 32, 3)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image(str(tmp_path / "nope.png"), 32)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(str(bad), 32)


def test_grid_and_png_writing(tmp_path):
    x = np.random.default_rng(1).uniform(-1, 1, (5, 4, 6, 3)).astype(np.float32)
    u8 = to_uint8(x)
    np.testing.assert_array_equal(u8, np.clip((x + 1) / 2 * 255, 0, 255).astype(np.uint8))
    grid = make_grid(u8, gap=1)
    assert grid.shape == (2 * 4 + 1, 3 * 6 + 2, 3)
    np.testing.assert_array_equal(grid[5:9, 7:13], u8[4])
    paths = save_images(x, str(tmp_path))
    assert [os.path.basename(p) for p in paths] == [f"image_{i:03d}.png" for i in range(5)] + ["grid.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(paths[2])), u8[2])


def test_unimm_generate_writes_pngs_from_a_workdir(ckpt, tmp_path, capsys):
    _, path = ckpt
    work = tmp_path / "work"
    shutil.copytree(path, work / "model")  # what unimm-train exports into WORKDIR/model
    out = tmp_path / "out"
    rc = gen_cli.main(["--checkpoint", str(work), "--prompt", "a red circle", "--num-images", "3", "--cfg", "4",
                       "--temperature", "0.8", "--top-k", "20", "--seed", "5", "--max-batch", "2", "--out", str(out)])
    assert rc == 0
    assert sorted(os.listdir(out)) == ["grid.png", "image_000.png", "image_001.png", "image_002.png"]
    model = uj.load_pretrained(str(work))
    assert model.checkpoint_dir == str(work / "model")
    ids = [generation_prompt_ids(load_text_tokenizer(path), "a red circle", model.config.tokens)]
    codes = model.generate_image_tokens(ids, num_images=3, cfg_weight=4.0, temperature=0.8, top_k=20, seed=5)
    want = to_uint8(model.vq_decode(codes))
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"image_{i:03d}.png")), want[i])
    assert Image.open(out / "grid.png").size == (2 * 16 + 2, 2 * 16 + 2)


def test_unimm_generate_uses_the_flow_sampler_when_offered(ckpt, tmp_path, monkeypatch):
    _, path = ckpt
    calls = {}
    real = uj.load_pretrained(path)

    class FlowModel:
        config, checkpoint_dir = real.config, real.checkpoint_dir

        def generate_images_flow(self, input_ids, *, num_images=1, steps=30, cfg_weight=2.0, seed=0):
            calls.update(ids=input_ids, num_images=num_images, steps=steps, cfg_weight=cfg_weight, seed=seed)
            return np.zeros((num_images, 8, 8, 3), np.float32)

    monkeypatch.setattr(uj, "load_pretrained", lambda p: FlowModel())
    assert gen_cli.main(["--checkpoint", path, "--prompt", "a red circle", "--num-images", "2", "--out",
                         str(tmp_path)]) == 0
    assert calls["steps"] == 30 and calls["cfg_weight"] == 2.0 and calls["num_images"] == 2
    assert calls["ids"][0][-1] == real.config.tokens.boi_token_id
    assert len(os.listdir(tmp_path)) == 3


def test_unimm_chat_prints_the_transformers_answer_last(ckpt, picture, capsys):
    hf, path = ckpt
    rc = chat_cli.main(["--checkpoint", path, "--image", picture, "--question", "what is this ?",
                        "--max-new-tokens", "6"])
    assert rc == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    tok = load_text_tokenizer(path)
    model = uj.load_pretrained(path)
    ids = understanding_prompt_ids(tok, "what is this ?", model.config.tokens, 16)
    px = load_image(picture, 32)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), pixel_values=torch.tensor(px).permute(0, 3, 1, 2),
                          attention_mask=torch.ones((1, len(ids)), dtype=torch.long), max_new_tokens=6,
                          do_sample=False).numpy()[0, len(ids):]
    ref = ref[: list(ref).index(2)] if 2 in ref else ref
    assert last == " ".join(tok.decode(ref.tolist()).split())
    assert last  # the random model says something


def test_cli_errors_are_clear(ckpt, picture, tmp_path, capsys):
    _, path = ckpt
    no_tok = tmp_path / "no_tok"
    shutil.copytree(path, no_tok)
    os.remove(no_tok / "tokenizer.json")
    assert chat_cli.main(["--checkpoint", str(no_tok), "--image", picture, "--question", "what"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert gen_cli.main(["--checkpoint", str(no_tok), "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert chat_cli.main(["--checkpoint", path, "--image", str(tmp_path / "missing.png"), "--question", "q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert chat_cli.main(["--checkpoint", str(tmp_path), "--image", picture, "--question", "q"]) == 2
    assert "unknown layout" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="model/ subdirectory"):
        (tmp_path / "w" / "model").mkdir(parents=True)
        uj.load_pretrained(str(tmp_path / "w"))
