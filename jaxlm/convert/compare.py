"""jaxlm and transformers side by side on the same inputs (`tools/convert_hf.py check`, tests).

  batch = compare.make_batch(hf_dir, n=8, tokenizer=convert.tokenizer(hf_dir))
  params = compare.fill_missing(hf_dir, model_config, convert.import_params(hf_dir, model_config))
  diffs = compare.side_by_side(hf_dir, model_config, params, batch)  # {output: per-example max|diff|}

Compared are the outputs the Hugging Face model has: BERT's last hidden states and pooled [CLS]
(+ masked-LM and next-sentence logits when the file has the heads), GPT-2's and T5's logits,
ViT's final hidden states (+ logits with a classifier), CLIP's and SigLIP's unit image and text
embeddings, logit scale (SigLIP's bias too) and pair logits. Positions the batch pads are left out.
transformers and torch are imported on use: only this module needs them.

A dual encoder (CLIP, SigLIP) is compared as the image_text run `config` that holds it
(`model_config` below: the run config, updated with `convert.config_overrides`).
"""

import functools

import flax
import flax.linen as nn
import jax
import numpy as np

from jaxlm import models
from jaxlm.convert import clip, hf as hf_lib, siglip
from jaxlm.convert.rules import DualFamily
from jaxlm.models import dual_encoder

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "A journey of a thousand miles begins with a single step.",
    "Colorless green ideas sleep furiously.",
    "She sells sea shells by the sea shore, or so they say.",
    "The committee will meet again on Thursday to review the budget.",
    "Rain is expected in the northern valleys later this week.",
    "He opened the letter slowly, afraid of what it might say.",
)


def sentences(n: int) -> list[str]:
    """`n` real English sentences: SST-2's dev set under $JAXLM_DATA_DIR, else built-in ones."""
    from jaxlm.data import builders  # pylint: disable=import-outside-toplevel  (imports TFDS)

    path = builders.jaxlm_data_dir() / "sst2" / "dev.tsv"
    if path.is_file():
        return [line.split("\t")[0] for line in path.read_text().splitlines()[1:n + 1]]
    return [SENTENCES[i % len(SENTENCES)] for i in range(n)]


def make_batch(hf_dir: str, n: int = 8, seed: int = 0, tokenizer=None) -> dict:
    """`n` examples for the checkpoint in `hf_dir`: real sentences encoded by `tokenizer` (random
    token ids without one) for text models, random images for ViT. Numpy arrays in
    transformers' names; `mask` marks the positions compared."""
    family, hf = hf_lib.read_config(hf_dir)
    rng = np.random.default_rng(seed)
    if isinstance(family, DualFamily):
        whole_rows = hf_lib.config_overrides(hf_dir)["model"]["text_pool"] == "last"
        return (_whole_rows if whole_rows else _dual_batch)(hf, n, rng, tokenizer)
    if family.name == "vit":
        shape = (n, hf["num_channels"], hf["image_size"], hf["image_size"])
        return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}
    if tokenizer is None:
        sequences = [rng.integers(3, hf["vocab_size"], rng.integers(3, 13)) for _ in range(n)]
        specials = {"cls": 1, "sep": 2, "pad": 0, "eos": 1}
    else:
        sequences = [tokenizer.encode(text) for text in sentences(n)]
        specials = {"cls": tokenizer.cls_id, "sep": tokenizer.sep_id, "pad": tokenizer.pad_id or 0,
                    "eos": tokenizer.eos_id}
    max_len = hf_lib.model_overrides(hf_dir).get("max_len", 512)
    rows = [{key: list(ids)[:max_len] for key, ids in row.items()}
            for row in ROWS[family.name]([list(s) for s in sequences], specials)]
    return _pad(rows, specials["pad"], "decoder_input_ids" if family.name == "t5" else "input_ids")


def _bert_rows(sequences, specials):
    """Sentence pairs [CLS] a [SEP] b [SEP] (b: the next sentence), segments 0 then 1."""
    for k, a in enumerate(sequences):
        b = sequences[(k + 1) % len(sequences)]
        yield {"input_ids": [specials["cls"], *a, specials["sep"], *b, specials["sep"]],
               "token_type_ids": [0] * (len(a) + 2) + [1] * (len(b) + 1)}


def _gpt_rows(sequences, specials):
    for s in sequences:
        yield {"input_ids": s}


def _t5_rows(sequences, specials):
    """The sentence + EOS in, the same sentence teacher-forced out (decoding starts at pad)."""
    for s in sequences:
        yield {"input_ids": [*s, specials["eos"]], "decoder_input_ids": [specials["pad"], *s]}


ROWS = {"bert": _bert_rows, "gpt": _gpt_rows, "t5": _t5_rows}


def _dual_batch(hf: dict, n: int, rng, tokenizer) -> dict:
    """Random images and CLIP's text rows: BOS, the sentence (`tokenizer`'s pieces, or random ids
    other than EOS and BOS), EOS, right-padded with the pad id, so that the EOS a row pools is
    not at its last position."""
    text, vision = hf["text_config"], hf["vision_config"]
    shape = (n, vision["num_channels"], vision["image_size"], vision["image_size"])
    if tokenizer is None:
        specials = {text.get("bos_token_id"), text["eos_token_id"]}
        choices = np.array([i for i in range(text["vocab_size"]) if i not in specials])
        sequences = [rng.choice(choices, rng.integers(1, text["max_position_embeddings"] - 2)) for _ in range(n)]
        bos, eos, pad = text.get("bos_token_id"), text["eos_token_id"], text.get("pad_token_id")
    else:
        sequences = [tokenizer.encode(sentence) for sentence in sentences(n)]
        bos, eos, pad = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    keep = text["max_position_embeddings"] - 2
    rows = [{"input_ids": [*([] if bos is None else [bos]), *list(s)[:keep], eos]} for s in sequences]
    batch = _pad(rows, eos if pad is None else pad, "input_ids")
    return {"pixel_values": rng.standard_normal(shape).astype(np.float32), **batch}


def _whole_rows(hf: dict, n: int, rng, tokenizer) -> dict:
    """Random images and SigLIP's text rows: the sentence (`tokenizer`'s pieces and its EOS, padded
    with EOS; or random ids padded with the pad id) to the full length, every position attended (the mask all
    ones): the last position, which SigLIP pools, is padding in most rows."""
    text, vision = hf["text_config"], hf["vision_config"]
    shape = (n, vision["num_channels"], vision["image_size"], vision["image_size"])
    length = text["max_position_embeddings"]
    if tokenizer is None:
        rows = [list(rng.integers(0, text["vocab_size"], rng.integers(1, length))) for _ in range(n)]
        pad = text.get("pad_token_id") or 0
    else:
        rows = [[*list(tokenizer.encode(sentence))[:length - 1], tokenizer.eos_id] for sentence in sentences(n)]
        pad = tokenizer.eos_id  # SigLIP pads with EOS, as the task does
    ids = np.array([row + [pad] * (length - len(row)) for row in rows], np.int32)
    return {"pixel_values": rng.standard_normal(shape).astype(np.float32), "input_ids": ids,
            "attention_mask": np.ones_like(ids)}


def _pad(rows: list[dict], pad_id: int, compared: str) -> dict:
    """Right-pads every field; attention masks for the inputs and `mask` for `compared`."""
    batch = {}
    for key in rows[0]:
        length = max(len(row[key]) for row in rows)
        fill = pad_id if key.endswith("input_ids") else 0
        batch[key] = np.array([row[key] + [fill] * (length - len(row[key])) for row in rows], np.int32)
        mask = np.array([[1] * len(row[key]) + [0] * (length - len(row[key])) for row in rows], np.int32)
        if key == "input_ids":
            batch["attention_mask"] = mask
        if key == compared:
            batch["mask"] = mask
    return batch


def fill_missing(hf_dir: str, model_config, params: dict) -> dict:
    """Imported `params` completed with zeros for the modules the file lacks, which jaxlm runs
    but nothing compares (e.g. BERT's pretraining heads for a BertModel file; CLIP's patch
    embedding bias, which it does not have)."""
    family, hf = hf_lib.read_config(hf_dir)
    if isinstance(family, DualFamily):
        shapes = hf_lib.dual_shapes(family, model_config, unscanned=False)
        flat = {path: np.zeros(shape, np.float32) for path, shape in shapes.items()}
        flat.update(flax.traverse_util.flatten_dict(params, sep="/"))
        return flax.traverse_util.unflatten_dict(flat, sep="/")
    model = models.get(model_config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), **family.init_inputs(hf)))
    flat = flax.traverse_util.flatten_dict(nn.unbox(shapes["params"]), sep="/")
    flat = {path: np.zeros(x.shape, x.dtype) for path, x in flat.items()}
    flat.update(flax.traverse_util.flatten_dict(params, sep="/"))
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def side_by_side(hf_dir: str, model_config, params: dict, batch: dict) -> dict:
    """{output: per-example max |jaxlm - transformers|} for jaxlm `params` of `model_config` and
    the Hugging Face model in `hf_dir` on `batch`."""
    family, _ = hf_lib.read_config(hf_dir)
    heads = has_heads(hf_dir)
    run = JAXLM_RUNNERS[family.name]
    if isinstance(family, DualFamily):
        model = dual_encoder.from_run_config(model_config)
        run = functools.partial(run, clamp=model_config.task.contrastive_loss == "clip")
    else:
        model = models.get(model_config)
    ours = run(model, params, batch)
    theirs = HF_RUNNERS[family.name](load_hf_model(hf_dir, heads), batch, heads)
    diffs = {}
    for key, reference in theirs.items():
        diff = np.abs(np.asarray(ours[key], np.float64) - reference)
        if diff.ndim == 3 and "mask" in batch:  # [batch, length, features]: skip padding
            diff = diff * batch["mask"][..., None]
        diffs[key] = diff.reshape(len(diff), -1).max(axis=1)
    return diffs


def has_heads(hf_dir: str) -> bool:
    """Whether the file holds the heads of its family's class with heads (BERT's cls.*, ViT's
    classifier); always for families without optional heads."""
    family, _ = hf_lib.read_config(hf_dir)
    if isinstance(family, DualFamily) or not family.heads:
        return True
    return any(name.startswith(family.top_level) for name in hf_lib.read_tensors(hf_dir, family))


def load_hf_model(hf_dir: str, heads: bool):
    """The transformers model, with or without heads (`Family.architectures`), float32, in eval
    mode."""
    import torch  # pylint: disable=import-outside-toplevel
    import transformers  # pylint: disable=import-outside-toplevel

    family, _ = hf_lib.read_config(hf_dir)
    model_class = getattr(transformers, family.architectures[0 if heads else 1])
    kwargs = {} if heads else BACKBONE_KWARGS.get(family.name, {})
    return model_class.from_pretrained(hf_dir, dtype=torch.float32, **kwargs).eval()


# What the backbone-only class needs to match jaxlm (jaxlm's ViT has no pooler).
BACKBONE_KWARGS = {"vit": {"add_pooling_layer": False}}


def _bert_jaxlm(model, params, b):
    ids = b["input_ids"]
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    out = jax.jit(model.apply)({"params": params}, ids, b["token_type_ids"], b["attention_mask"],
                               positions)
    return {"hidden": out["hidden"], "pooled": out["pooled"], "mlm_logits": out["mlm_logits"],
            "nsp_logits": out["nsp_logits"]}


def _gpt_jaxlm(model, params, b):
    return {"logits": jax.jit(model.apply)({"params": params}, b["input_ids"])}


def _t5_jaxlm(model, params, b):
    logits = jax.jit(model.apply)({"params": params}, b["input_ids"], b["decoder_input_ids"],
                                  b["attention_mask"])
    return {"logits": logits}


def _jaxlm_pixels(pixel_values, vit) -> np.ndarray:
    """transformers' (normalized, NCHW) `pixel_values` as the NHWC pixels that `vit` normalizes to
    the same values (its `pixel_mean` / `pixel_std`, imported from preprocessor_config.json)."""
    images = np.asarray(pixel_values).transpose(0, 2, 3, 1)
    if vit.pixel_mean:
        images = images * np.asarray(vit.pixel_std, np.float32) + np.asarray(vit.pixel_mean, np.float32)
    return images


def _vit_jaxlm(model, params, b):
    """Logits, and the final norm's output (the hidden states) caught on the way."""
    images = _jaxlm_pixels(b["pixel_values"], model)

    @jax.jit
    def run(params, images):
        return model.apply({"params": params}, images, mutable=["intermediates"],
                           capture_intermediates=lambda module, _: module.name == "final_norm")

    logits, state = run(params, images)
    hidden = state["intermediates"]["final_norm"]["__call__"][0]
    return {"logits": logits, "hidden": hidden.reshape(len(images), -1, hidden.shape[-1])}


def _dual_jaxlm(model, params, b, clamp: bool = True):
    """Unit image and text embeddings, the task's log scale (and SigLIP's bias) beside the model's
    parameters, and the pair logits the task computes of them (the scale `clamp`ed as CLIP's loss
    does)."""
    task = (clip.LOG_SCALE, siglip.LOGIT_BIAS)
    model_params = {k: v for k, v in params.items() if k not in task}
    images, texts = jax.jit(model.apply)({"params": model_params}, _jaxlm_pixels(b["pixel_values"], model.image),
                                         b["input_ids"], b["attention_mask"])
    bias = params.get(siglip.LOGIT_BIAS, 0.0)
    out = {"image_embeds": images, "text_embeds": texts,
           "logit_scale": np.full(len(images), np.asarray(params[clip.LOG_SCALE])),
           "logits_per_image": dual_encoder.pair_logits(
               images, texts, dual_encoder.logit_scale(params[clip.LOG_SCALE], clamp), bias)}
    if siglip.LOGIT_BIAS in params:
        out["logit_bias"] = np.full(len(images), np.asarray(bias))
    return out


JAXLM_RUNNERS = {"bert": _bert_jaxlm, "gpt": _gpt_jaxlm, "t5": _t5_jaxlm, "vit": _vit_jaxlm,
                 "dual_encoder": _dual_jaxlm}


def _torch_outputs(fn):
    """Runs `fn(model, {name: tensor}, heads)` without gradients; numpy float64 out."""
    def run(model, batch, heads):
        import torch  # pylint: disable=import-outside-toplevel

        with torch.no_grad():
            out = fn(model, {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}, heads)
        return {k: v.numpy().astype(np.float64) for k, v in out.items()}
    return run


@_torch_outputs
def _bert_hf(model, b, heads):
    inputs = dict(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"].long(),
                  token_type_ids=b["token_type_ids"].long())
    base = model.bert(**inputs) if heads else model(**inputs)
    out = {"hidden": base.last_hidden_state, "pooled": base.pooler_output}
    if heads:
        full = model(**inputs)
        out.update(mlm_logits=full.prediction_logits, nsp_logits=full.seq_relationship_logits)
    return out


@_torch_outputs
def _gpt_hf(model, b, heads):
    return {"logits": model(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"]).logits}


@_torch_outputs
def _t5_hf(model, b, heads):
    return {"logits": model(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"],
                            decoder_input_ids=b["decoder_input_ids"].long()).logits}


@_torch_outputs
def _vit_hf(model, b, heads):
    base = model.vit if heads else model
    out = {"hidden": base(pixel_values=b["pixel_values"]).last_hidden_state}
    if heads:
        out["logits"] = model(pixel_values=b["pixel_values"]).logits
    return out


@_torch_outputs
def _dual_hf(model, b, heads):
    out = model(input_ids=b["input_ids"].long(), attention_mask=b["attention_mask"].long(),
                pixel_values=b["pixel_values"])
    n = len(b["input_ids"])
    found = {"image_embeds": out.image_embeds, "text_embeds": out.text_embeds,
             "logit_scale": model.logit_scale.detach().reshape(()).expand(n),
             "logits_per_image": out.logits_per_image}
    if hasattr(model, "logit_bias"):  # SigLIP
        found["logit_bias"] = model.logit_bias.detach().reshape(()).expand(n)
    return found


HF_RUNNERS = {"bert": _bert_hf, "gpt": _gpt_hf, "t5": _t5_hf, "vit": _vit_hf, "dual_encoder": _dual_hf}
