"""SigLIP (`SiglipModel`) -> jaxlm's dual encoder (`image_text` task, `contrastive_loss=siglip`): a
bidirectional `gpt` text tower (`causal=False`) pooled at the last position of its padded row
(`text_pool=last`) and projected by SigLIP's text head (`text_projection` with a bias), a `vit`
image tower without a class token whose multihead attention pooling (`pool=map`) is the image
embedding (`task.image_projection=False`), and the logit scale and bias as the task's `log_scale`
and `logit_bias`.

SigLIP's encoder layer is CLIP's (pre-norm, `layer_norm1`, `layer_norm2`) in both towers; its
patch convolution has a bias and there is no norm before the image encoder. The attention
pooling head is `torch.nn.MultiheadAttention` (q, k, v packed in `in_proj_weight`) from a learned
`probe`, then `layernorm` and the MLP as a residual. SigLIP's `gelu_pytorch_tanh` is jaxlm's
`gelu` (the tanh approximation).

The text tower attends over the whole row, padding too, as SigLIP was trained (big_vision pads
to `max_position_embeddings` and passes no mask); transformers' `SiglipModel` agrees when called
without `attention_mask` (or an all-ones one).
"""

import dataclasses

from jaxlm.convert import clip
from jaxlm.convert.clip import LOG_SCALE, encoder_layer
from jaxlm.convert.rules import DualFamily, Kernel, Patches, Rule, Tower, Vector, copy, dense, norm

# The task's parameter that holds SigLIP's logit_bias (jaxlm.tasks.image_text.BIAS).
LOGIT_BIAS = "logit_bias"
TEXT_HEAD = "text_model.head"  # SigLIP's text projection, named inside the text tower
MAP = "head"  # the vision tower's attention pooling head
# The towers' config values that transformers' SiglipTextConfig and SiglipVisionConfig default.
TOWER_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}


def text_rules(hf: dict):
    return [*copy("embeddings.token_embedding.weight", "embed/embedding"),
            *copy("embeddings.position_embedding.weight", "pos_embedding"),
            *encoder_layer("decoder"),
            *norm("final_layer_norm", "final_norm")]


def vision_rules(hf: dict):
    return [Rule("embeddings.patch_embedding.weight", ("patch_embed/kernel",),
                 Patches(hf["patch_size"], hf["num_channels"])),
            *copy("embeddings.patch_embedding.bias", "patch_embed/bias"),
            *copy("embeddings.position_embedding.weight", "pos_embedding"),
            *encoder_layer("encoder"),
            *norm("post_layernorm", "final_norm"),
            *copy(f"{MAP}.probe", "map/probe"),
            Rule(f"{MAP}.attention.in_proj_weight", tuple(f"map/attn/{n}/kernel" for n in ("query", "key", "value")),
                 Kernel()),
            Rule(f"{MAP}.attention.in_proj_bias", tuple(f"map/attn/{n}/bias" for n in ("query", "key", "value")),
                 Vector()),
            *dense(f"{MAP}.attention.out_proj", "map/attn/out", n_in=2),
            *norm(f"{MAP}.layernorm", "map/norm"),
            *dense(f"{MAP}.mlp.fc1", "map/mlp/wi"),
            *dense(f"{MAP}.mlp.fc2", "map/mlp/wo")]


def text_normalize(hf: dict) -> dict:
    return {**hf, "projection_size": hf.get("projection_size") or hf["hidden_size"]}


# SigLIP's towers are CLIP's but for these.
TEXT = dataclasses.replace(
    clip.TEXT,
    model_type="siglip_text_model",
    architectures=("SiglipTextModel",),
    fixed={**clip.TEXT.fixed, "causal": False, "text_pool": "last"},
    rules=text_rules,
    hf_defaults={**TOWER_DEFAULTS, "vocab_size": 32000, "max_position_embeddings": 64},
    normalize=text_normalize,
    model_values=lambda hf: {},
)

VISION = dataclasses.replace(
    clip.VISION,
    model_type="siglip_vision_model",
    architectures=("SiglipVisionModel",),
    fixed={**clip.VISION.fixed, "pool": "map", "pre_norm": False},
    rules=vision_rules,
    hf_defaults={**TOWER_DEFAULTS, "num_channels": 3, "image_size": 224, "patch_size": 16},
    required={"vision_use_head": True},
    normalize=clip.square_images("SigLIP"),
    optional=(),
)


def run_config(hf: dict) -> dict:
    """The run's values outside the towers: the siglip task, whose embedding is the image tower's
    pooled width and the text head's, and text rows as long as SigLIP pads them."""
    text, vision = hf["text_config"], hf["vision_config"]
    if text["projection_size"] != vision["hidden_size"]:
        raise ValueError(f"SigLIP text_config projection_size={text['projection_size']} differs from "
                         f"vision_config hidden_size={vision['hidden_size']}: the embeddings would not compare")
    return {"task": {"name": "image_text", "contrastive_loss": "siglip", "projection_dim": text["projection_size"],
                     "projection_bias": True, "image_projection": False},
            "data": {"seq_len": text["max_position_embeddings"], "image_channels": vision["num_channels"]}}


FAMILY = DualFamily(
    model_type="siglip",
    architectures=("SiglipModel",),
    towers=(Tower(TEXT, "text_config", "text_model.", "model", "text"),
            Tower(VISION, "vision_config", "vision_model.", "image_model", "image")),
    rules=lambda hf: [*dense(TEXT_HEAD, "text_projection"),
                      *copy("logit_scale", LOG_SCALE, hf_lead=1),
                      *copy("logit_bias", LOGIT_BIAS, hf_lead=1)],
    config=run_config,
    task_params=(LOG_SCALE, LOGIT_BIAS),
    tokenizers=(("tokenizer.json", "huggingface"), ("spiece.model", "sentencepiece")),
)
