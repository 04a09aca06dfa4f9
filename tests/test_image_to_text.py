"""Image-to-text (task.name='captioning' | 'vqa'): CIDEr-D, the decoder rows of a question and its
answer, decoding that continues a forced prompt, and a ViT + T5 decoder that learns to caption
and to answer questions about a folder of images, read back through `jaxlm.predict`."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import predict, tasks
from jaxlm.data import builders, image_text, images
from jaxlm.infer import seq2seq_decoding as decoding
from jaxlm.tasks import caption_metrics
from jaxlm.tasks import image_to_text as task_lib
from jaxlm.train import loop

COLOURS = {"red": (230, 20, 20), "blue": (20, 20, 230), "green": (20, 200, 20), "yellow": (240, 230, 20)}


def test_cider_d_is_ten_for_a_unique_reference_and_zero_for_unrelated_words():
    references = [["a red square on white"], ["a blue circle on black"], ["green grass on a hill"]]
    assert caption_metrics.cider_d([r[0] for r in references], references) == pytest.approx(10.0)
    # every n-gram length counts: three words have no 4-grams
    assert caption_metrics.cider_d(["a red square", "the sea"], [["a red square"], ["the sea"]]) == \
        pytest.approx((7.5 + 5.0) / 2)
    assert caption_metrics.cider_d(["tall trees", "dark night", "the sea"], references) == 0.0
    half = caption_metrics.cider_d(["a red circle on black", "a blue square on white", "green grass"], references)
    assert 0.5 < half < 6.0
    with pytest.raises(ValueError, match="one prediction per image"):
        caption_metrics.cider_d(["a"], references)
    assert caption_metrics.exact_match("Yes.", "yes") and not caption_metrics.exact_match("yes it is", "yes")


@pytest.mark.skipif(not (builders.jaxlm_data_dir() / "fashion_mnist").is_dir(), reason="no fashion_mnist")
def test_questions_about_fashion_mnist_are_answered_by_the_class(data_dir):
    pairs = image_text.load(images.FASHION_MNIST, "test", data_dir=data_dir, questions=True)
    answers = {y: dict(pairs.captions[int(np.flatnonzero(pairs.labels == y)[0])]) for y in (0, 7, 8)}
    assert answers[7]["is this worn on the feet?"] == "yes" and answers[0]["is this worn on the feet?"] == "no"
    assert answers[8]["what is this?"] == "a bag" and answers[8]["can you carry things in it?"] == "yes"


def write_folder(folder: Path, copies: int = 3):
    """Solid-colour squares (with noise), each captioned and asked about its colour."""
    from PIL import Image
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions, questions = [], []
    for name, rgb in COLOURS.items():
        for k in range(copies):
            pixels = np.clip(np.asarray(rgb) + rng.integers(-20, 20, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}{k}.png")
            captions.append({"image": f"{name}{k}.png",  # 4 words or more: BLEU counts 4-grams
                             "captions": [f"a {name} square of colour", f"a picture of something {name}"][: 1 + k % 2]})
            questions += [{"image": f"{name}{k}.png", "question": "what colour is it?", "answer": name},
                          {"image": f"{name}{k}.png", "question": "is it red?", "answer": "yes" if name == "red" else "no"}]
    (folder / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions))
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))


def test_a_question_folder_reads_every_question_and_names_a_bad_line(tmp_path):
    write_folder(tmp_path / "f", copies=1)
    pairs = image_text.read_folder(str(tmp_path / "f"), questions=True)
    assert len(pairs) == 4 and all(len(qa) == 2 for qa in pairs.captions)
    assert ("is it red?", "yes") in pairs.captions[[i for i, qa in enumerate(pairs.captions) if ("what colour is it?", "red") in qa][0]]
    with open(tmp_path / "f" / "questions.jsonl", "a") as f:
        f.write('{"image": "red0.png", "question": "why?"}\n')
    with pytest.raises(ValueError, match=r"questions.jsonl:9: expected \{"):
        image_text.read_folder(str(tmp_path / "f"), questions=True)
    (tmp_path / "f" / "questions.jsonl").unlink()
    with pytest.raises(FileNotFoundError, match="has no questions.jsonl"):
        image_text.read_folder(str(tmp_path / "f"), questions=True)


def tiny_config(folder: Path, mode: str):
    c = config_lib.default_config()
    c.task.update(dict(name=mode, beam_size=2))
    c.data.update(dict(name=image_text.CAPTION_FOLDER, files=f"train={folder},validation={folder}",
                       tokenizer="sentencepiece", tokenizer_vocab_size=282, seq_len=32, target_len=32,
                       image_channels=3, pad_multiple=0))
    c.model.update(dict(name="t5", num_layers=1, num_decoder_layers=1, num_heads=2, emb_dim=32, head_dim=16,
                        mlp_dim=64, mlp="geglu", norm="rmsnorm", tie_embeddings=False, init_std=0.05,
                        scan_layers=False, max_len=32))
    c.image_model.update(dict(num_layers=1, emb_dim=32, num_heads=2, mlp_dim=64, patch_size=6))
    c.train.update(dict(steps=120, batch_size=8, log_every=40, eval_every=120, eval_batches=0, steps_per_call=40,
                        peak_flops=1e9))
    c.optim.update(dict(lr=3e-3, warmup_steps=10, end_lr=1e-4))
    c.checkpoint.update(dict(every=1000, async_save=False))
    c.sample.max_new_tokens = 0
    c.mesh.num_devices = 1
    return c


def build_task(config, workdir):
    task_class = tasks.get(config.task.name)
    return task_class(config, task_class.build_tokenizer(config, str(workdir)))


def test_a_question_is_the_prompt_of_its_answer_and_carries_no_loss(tmp_path):
    write_folder(tmp_path / "f", copies=1)
    task = build_task(tiny_config(tmp_path / "f", "vqa"), tmp_path / "run")
    row = task.encode_text(("what colour is it?", "red"))
    question, answer = (task.tokenizer.encode(t).tolist() for t in ("what colour is it?", "red"))
    sequence = question + answer + [task.eos_id]
    n, q = len(sequence), len(question)
    np.testing.assert_array_equal(row["decoder_target_tokens"][:n], sequence)
    np.testing.assert_array_equal(row["decoder_input_tokens"][:n], [0] + sequence[:-1])
    np.testing.assert_array_equal(row["decoder_loss_weights"][:n], [0] * q + [1] * (n - q))
    np.testing.assert_array_equal(row["prompt_tokens"][:q], question)
    assert not row["decoder_loss_weights"][n:].any() and not row["prompt_tokens"][q:].any()
    prompts = task.prompts(["what colour is it?", "red"])
    np.testing.assert_array_equal(prompts[0], row["prompt_tokens"])
    np.testing.assert_array_equal(prompts[1][:len(answer)], answer)
    assert not prompts[1][len(answer):].any()
    with pytest.raises(ValueError, match="no room for an answer"):
        task.encode_text(("what colour " * 20, "red"))


def test_decoding_continues_a_forced_prompt(tmp_path):
    """Greedy and beam search keep each row's prompt (rows of different lengths) and go on from
    it: the first free token is the full forward pass's argmax after the prompt."""
    write_folder(tmp_path / "f", copies=1)
    task = build_task(tiny_config(tmp_path / "f", "vqa"), tmp_path / "run")
    params = task.init(jax.random.key(3))["params"]
    pixels = np.random.default_rng(0).random((2, 12, 12, 3), np.float32)
    prompts = np.zeros((2, 5), np.int32)
    prompts[0, :5], prompts[1, :2] = [5, 9, 11, 20, 7], [30, 4]
    mask = np.ones((2, task.positions), bool)
    common = dict(encoder_mask=mask, prompt=prompts, max_len=12, eos_id=task.eos_id, vocab_size=task.tokenizer.vocab_size)
    greedy = decoding.decode(task.model, params, pixels, **common)
    beams = decoding.decode(task.model, params, pixels, beam_size=3, **common)
    for out in (greedy, beams):
        np.testing.assert_array_equal(out[0, :5], prompts[0])
        np.testing.assert_array_equal(out[1, :2], prompts[1, :2])
    for row, length in ((0, 5), (1, 2)):
        inputs = np.concatenate([[0], prompts[row, :length]])[None]
        logits = task.model.apply({"params": params}, pixels[row:row + 1], inputs)
        assert greedy[row, length] == int(np.argmax(logits[0, -1, :task.tokenizer.vocab_size]))
    unprompted = decoding.decode(task.model, params, pixels, **{**common, "prompt": None})
    assert not np.array_equal(unprompted[:, :2], greedy[:, :2])
    with pytest.raises(ValueError, match="leaves nothing to decode"):
        decoding.decode(task.model, params, pixels, **{**common, "max_len": 5})


@pytest.mark.parametrize("mode", [pytest.param("captioning", marks=pytest.mark.slow), "vqa"])
def test_a_vit_and_t5_decoder_learn_to_caption_and_answer(tmp_path, mode):
    """120 steps on 12 coloured squares: beam search names each image's colour (captions match a
    reference, answers are exact), and `predict_text` does the same for an image file."""
    write_folder(tmp_path / "f")
    config = tiny_config(tmp_path / "f", mode)
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    lines = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    final = [m for m in lines if any(k.startswith("eval/") for k in m)][-1]
    if mode == "vqa":
        assert final["eval/answer_accuracy"] == 1.0, final
    else:
        assert final["eval/bleu"] > 60 and final["eval/cider"] > 3, final  # (84.9, 6.5 measured; a caption
        # may be the one an image lacks)
    if mode == "vqa":  # as `python -m jaxlm.predict --text=...` reads them
        got = predict.predict(str(tmp_path / "run"), [f"{tmp_path / 'f' / 'blue1.png'} | is it red?"])[0]
        assert got["answer"] == "no", got
        with pytest.raises(ValueError, match=r"IMAGE_FILE\|QUESTION"):
            predict.predict(str(tmp_path / "run"), [str(tmp_path / "f" / "blue1.png")])
    else:
        got = predict.predict(str(tmp_path / "run"), [str(tmp_path / "f" / "green2.png")])[0]
        assert got["caption"] in ("a green square of colour", "a picture of something green"), got
    assert task_lib.named_class(images.FASHION_MNIST, "a photo of an ankle boot.") == 9
