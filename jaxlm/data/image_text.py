"""Image-text pairs for dual encoders (CLIP, SigLIP) and image-to-text models (captioning, visual
question answering): a split's images and their texts in memory -> Grain batches.

Where the pairs come from (`data.name`):
  jaxlm_mnist, jaxlm_fashion_mnist (any image data set `images.get_images` reads): every image
      is captioned by a description of its class, drawn from `DESCRIPTIONS` (several per class)
      in one of `TEMPLATES`; `holdout` classes are left out (zero-shot is measured on them).
  jaxlm_image_captions: your own folder (`data.files='train=DIR,validation=DIR'`) of PNG/JPEG
      images with `captions.jsonl` (one {"image": "file.png", "captions": ["...", ...]} per
      line) or `captions.tsv` (file<TAB>caption, a line per caption; an image may have several),
      decoded with Pillow, converted to `channels` and resized to `image_size`.
With `questions` (visual question answering) the texts are (question, answer) pairs: `QUESTIONS`
about the class of each image, or in your folder `questions.jsonl` (one {"image": "file.png",
"question": "...", "answer": "..."} per line; an image may have several).

An example is (image uint8 [H, W, C], captions list[str] or questions list[(str, str)], label int
or -1). Training draws one of its texts per epoch (from seed, epoch and example); evaluation a
fixed one (`eval_caption`). A batch:
{'image': float32[b, H, W, C] (pixel / 255), the caption's `encode` arrays [b, ...], 'label'
int32[b], 'index' int32[b] (eval: -1 on padding rows)}.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Callable, Sequence

import numpy as np

from jaxlm.data import batching, images as images_lib

CAPTION_FOLDER = "jaxlm_image_captions"
TEMPLATES = ("a photo of {}.", "a picture of {}.", "an image showing {}.", "{}.", "a small grayscale image of {}.",
             "a black and white photo of {}.", "a low-resolution picture of {}.", "there is {} in this image.")
DESCRIPTIONS = {
    images_lib.FASHION_MNIST: (
        ("a t-shirt", "a top", "a short-sleeved shirt", "a tee"),
        ("trousers", "a pair of pants", "long trousers", "pants"),
        ("a pullover", "a sweater", "a jumper", "a knitted pullover"),
        ("a dress", "a women's dress", "a long dress", "a summer dress"),
        ("a coat", "a jacket", "a warm coat", "an overcoat"),
        ("a sandal", "an open shoe", "a summer sandal", "a strappy sandal"),
        ("a shirt", "a button-up shirt", "a long-sleeved shirt", "a blouse"),
        ("a sneaker", "a sports shoe", "a trainer", "a running shoe"),
        ("a bag", "a handbag", "a purse", "a shoulder bag"),
        ("an ankle boot", "a boot", "a short boot", "a leather boot"),
    ),
    images_lib.MNIST: tuple(
        (f"the digit {word}", f"a handwritten {digit}", f"the number {word}", f"a {word}")
        for digit, word in enumerate(("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                      "nine"))),
}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
# Questions about an image of class y, each (question, y -> answer).
QUESTIONS = {
    images_lib.FASHION_MNIST: (
        ("what is this?", lambda y: DESCRIPTIONS[images_lib.FASHION_MNIST][y][0]),
        ("what is shown in the picture?", lambda y: DESCRIPTIONS[images_lib.FASHION_MNIST][y][0]),
        ("is this worn on the feet?", lambda y: _yes(y in (5, 7, 9))),
        ("is this worn on the upper body?", lambda y: _yes(y in (0, 2, 4, 6))),
        ("is this a kind of shoe?", lambda y: _yes(y in (5, 7, 9))),
        ("can you carry things in it?", lambda y: _yes(y == 8)),
    ),
    images_lib.MNIST: (
        ("what digit is this?", lambda y: DIGITS[y]),
        ("which number is written here?", lambda y: DIGITS[y]),
        ("is the number even?", lambda y: _yes(y % 2 == 0)),
        ("is it greater than four?", lambda y: _yes(y > 4)),
        ("what number comes after it?", lambda y: DIGITS[y + 1]),
    ),
}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


@dataclasses.dataclass
class Pairs:
    """A split in memory: images uint8 [n, H, W, C], captions (a list per image: texts, or
    (question, answer) pairs), labels [n] (-1: none), and the class names zero-shot prompts use
    (empty for a folder)."""

    images: np.ndarray
    captions: list[list[str]] | list[list[tuple[str, str]]]
    labels: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def class_captions(name: str, label: int) -> list[str]:
    """Every caption of class `label` of data set `name`: each description in each template."""
    return [template.format(d) for d in DESCRIPTIONS[name][label] for template in TEMPLATES]


def class_questions(name: str, label: int) -> list[tuple[str, str]]:
    """Every (question, answer) about an image of class `label` of data set `name`."""
    return [(question, answer(label)) for question, answer in QUESTIONS[name]]


def load(name: str, split: str, *, data_dir: str = "", files: str = "", image_size: int = 0, channels: int = 0,
         holdout: Sequence[int] = (), questions: bool = False) -> Pairs:
    """The pairs of a split (see the module docstring); `holdout` classes are dropped; with
    `questions`, (question, answer) pairs instead of captions."""
    if name == CAPTION_FOLDER:
        folder = dict(part.split("=", 1) for part in files.split(",") if part).get(split)
        if not folder:
            raise ValueError(f"data.name={CAPTION_FOLDER!r} reads folders given as data.files='train=DIR,"
                             f"validation=DIR'; data.files={files!r} names none for split {split!r}")
        return read_folder(folder, image_size=image_size, channels=channels, questions=questions)
    if name not in DESCRIPTIONS:
        raise ValueError(f"data.name={name!r}: image-text pairs come from {sorted(DESCRIPTIONS)} (class "
                         f"descriptions) or {CAPTION_FOLDER!r} (your own captioned images)")
    pixels, labels = images_lib.get_images(name, split, data_dir=data_dir)
    keep = ~np.isin(labels, np.asarray(list(holdout), np.int32))
    descriptions = DESCRIPTIONS[name]
    texts = class_questions if questions else class_captions
    per_class = [texts(name, y) for y in range(len(descriptions))]
    return Pairs(pixels[keep], [per_class[int(y)] for y in labels[keep]], labels[keep].astype(np.int32),
                 [options[0] for options in descriptions])


def read_folder(folder: str, *, image_size: int = 0, channels: int = 0, questions: bool = False) -> Pairs:
    """A captioned image folder: captions.jsonl or captions.tsv beside the images (with
    `questions`: questions.jsonl). A malformed line, an image that is missing or unreadable, an
    image without captions: an error naming it."""
    captions = _read_questions(folder) if questions else _read_captions(folder)
    if not captions:
        raise ValueError(f"{folder}: no {'questions about' if questions else 'captioned'} images")
    pixels = [read_image(folder, name, image_size, channels) for name in captions]
    shapes = {p.shape for p in pixels}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images of several sizes {sorted(shapes)[:3]}: set data.image_size")
    return Pairs(np.stack(pixels), list(captions.values()), np.full(len(pixels), -1, np.int32), [])


def _jsonl_records(path: str, keys: tuple[str, ...], shape: str):
    """(line number, the values of `keys`) of each non-empty line of a JSONL file; a line that is
    not such a record is an error naming it and the `shape` expected."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                yield number, tuple(record[key] for key in keys)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: expected {shape} ({type(e).__name__}: {e})") from None


def _read_questions(folder: str) -> dict[str, list[tuple[str, str]]]:
    path = os.path.join(folder, "questions.jsonl")
    shape = '{"image": FILE, "question": TEXT, "answer": TEXT}'
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} has no questions.jsonl (visual question answering reads {shape} lines)")
    questions: dict[str, list[tuple[str, str]]] = {}
    for number, (image, question, answer) in _jsonl_records(path, ("image", "question", "answer"), shape):
        if not all(isinstance(t, str) and t.strip() for t in (question, answer)):
            raise ValueError(f"{path}:{number}: 'question' and 'answer' must be non-empty texts")
        questions.setdefault(image, []).append((question, answer))
    return questions


def _read_captions(folder: str) -> dict[str, list[str]]:
    captions: dict[str, list[str]] = {}
    jsonl, tsv = os.path.join(folder, "captions.jsonl"), os.path.join(folder, "captions.tsv")
    if os.path.isfile(jsonl):
        shape = '{"image": FILE, "captions": [TEXT, ...]}'
        for number, (image, texts) in _jsonl_records(jsonl, ("image", "captions"), shape):
            if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
                raise ValueError(f"{jsonl}:{number}: 'captions' must be a non-empty list of non-empty texts")
            captions.setdefault(image, []).extend(texts)
    elif os.path.isfile(tsv):
        with open(tsv, encoding="utf-8", newline="") as f:
            for number, row in enumerate(csv.reader(f, delimiter="\t"), 1):
                if len(row) != 2 or not row[1].strip():
                    raise ValueError(f"{tsv}:{number}: expected FILE<TAB>CAPTION")
                captions.setdefault(row[0], []).append(row[1])
    else:
        raise FileNotFoundError(f"{folder} has neither captions.jsonl nor captions.tsv")
    return captions


def read_image(folder: str, name: str, image_size: int, channels: int) -> np.ndarray:
    """uint8 [H, W, C] of image file `name`, converted to `channels` (0: RGB); with `image_size`,
    its centred square (the whole image when square) resized to image_size x image_size, so
    that a photo keeps its proportions (as CLIP's and ViT's processors centre-crop)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel

    try:
        with Image.open(os.path.join(folder, name)) as image:
            image = image.convert({1: "L", 3: "RGB", 0: "RGB"}[channels])
            if image_size:
                side = min(image.size)
                left, top = (image.size[0] - side) // 2, (image.size[1] - side) // 2
                image = image.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + side, top + side))
            array = np.asarray(image, np.uint8)
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read image {name!r} ({type(e).__name__}: {e})") from None
    return array[..., None] if array.ndim == 2 else array


def eval_caption(pairs: Pairs, i: int) -> str:
    """Example i's caption in evaluation: one of its captions, chosen by its index (fixed)."""
    return pairs.captions[i][i % len(pairs.captions[i])]


def _row(pairs: Pairs, i: int, caption: str, encode: Callable[[str], dict]) -> dict:
    return {"image": pairs.images[i].astype(np.float32) / 255.0, **encode(caption),
            "label": np.int32(pairs.labels[i]), "index": np.int32(i)}


def train_iterator(pairs: Pairs, encode: Callable[[str], dict], *, global_batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1):
    """Endless, checkpointable batches: a new permutation and a new caption draw every epoch."""
    if not len(pairs):
        raise ValueError("There are no image-caption pairs to train on.")

    def example(epoch: int, i: int) -> dict:
        options = pairs.captions[i]
        pick = np.random.default_rng([seed, epoch, i]).integers(len(options))
        return _row(pairs, i, options[pick], encode)

    ds = batching.per_process_batches(batching.shuffled_epochs(len(pairs), seed, example),
                                      global_batch_size=global_batch_size, process_index=process_index,
                                      process_count=process_count)
    return batching.iterate(ds)


def eval_batches(pairs: Pairs, encode: Callable[[str], dict], *, global_batch_size: int, max_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[dict]:
    """Every pair in order with its `eval_caption`; padding rows have index -1 and label -1."""
    if not len(pairs):
        raise ValueError("There are no image-caption pairs to evaluate.")
    first = _row(pairs, 0, eval_caption(pairs, 0), encode)
    padding = {k: np.zeros_like(v) for k, v in first.items()} | {"index": np.int32(-1), "label": np.int32(-1)}
    return batching.eval_batches(
        len(pairs), lambda rows: batching.stack([_row(pairs, int(i), eval_caption(pairs, int(i)), encode) for i in rows]),
        global_batch_size=global_batch_size, max_batches=max_batches, process_index=process_index,
        process_count=process_count, padding=padding)
