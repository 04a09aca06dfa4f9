"""CLIP (`CLIPModel`) -> jaxlm's dual encoder (`image_text` task): a causal `gpt` text tower
pooled at its EOS token, a `vit` image tower with `pre_norm`, the two projections, and the
logit scale as the task's `log_scale`.

CLIP's encoder layer is pre-norm (`layer_norm1` before attention, `layer_norm2` before the MLP)
in both towers. The text tower's `final_layer_norm` is the GPT's `final_norm`; the image tower's
`post_layernorm` on the pooled class token is the ViT's `final_norm` (applied to every token,
then the class token pooled: the same for it). CLIP's patch convolution has no bias: jaxlm's
stays at its initial zeros (`optional`). Which position the text tower pools is transformers'
rule: the first `eos_token_id`, or for configs whose `eos_token_id` is 2 (from before
transformers' PR #24773) the largest id of the row.
"""

import numpy as np

from jaxlm.convert.rules import (ACTIVATIONS, DualFamily, Family, Patches, Rule, Tower, attention, copy, dense,
                                 norm)

# The task's parameter that holds CLIP's logit_scale (jaxlm.tasks.image_text.SCALE).
LOG_SCALE = "log_scale"
LEGACY_EOS = 2  # transformers pools the largest id instead of this eos_token_id


def encoder_layer(stack: str):
    """The rules of one CLIP encoder layer into jaxlm's pre-norm block of `stack`."""
    hf, ours = "encoder.layers.{i}", f"{stack}/layers_{{i}}"
    return [*norm(f"{hf}.layer_norm1", f"{ours}/attn_norm"),
            *attention(f"{hf}.self_attn", f"{hf}.self_attn.out_proj", f"{ours}/attn",
                       names=("q_proj", "k_proj", "v_proj")),
            *norm(f"{hf}.layer_norm2", f"{ours}/mlp_norm"),
            *dense(f"{hf}.mlp.fc1", f"{ours}/mlp/wi"),
            *dense(f"{hf}.mlp.fc2", f"{ours}/mlp/wo")]


def text_rules(hf: dict):
    return [*copy("embeddings.token_embedding.weight", "embed/embedding"),
            *copy("embeddings.position_embedding.weight", "pos_embedding"),
            *encoder_layer("decoder"),
            *norm("final_layer_norm", "final_norm")]


def vision_rules(hf: dict):
    return [*copy("embeddings.class_embedding", "cls", flat=True),
            Rule("embeddings.patch_embedding.weight", ("patch_embed/kernel",),
                 Patches(hf["patch_size"], hf["num_channels"])),
            *copy("embeddings.position_embedding.weight", "pos_embedding"),
            *norm("pre_layrnorm", "pre_norm"),
            *encoder_layer("encoder"),
            *norm("post_layernorm", "final_norm")]


def text_pooling(hf: dict) -> dict:
    eos = hf["eos_token_id"]
    if not isinstance(eos, int):
        raise ValueError(f"CLIP text_config eos_token_id={eos!r}: jaxlm pools at one EOS id (an int)")
    return {"text_pool": "max_id" if eos == LEGACY_EOS else "eos", "eos_id": eos}


def square_images(model: str):
    """The `normalize` of a vision sub-config: its image and patch sizes must be ints (square)."""
    def normalize(hf: dict) -> dict:
        for key in ("image_size", "patch_size"):
            if not isinstance(hf[key], int):
                raise ValueError(f"{model} vision_config {key}={hf[key]!r}: jaxlm's ViT takes square images (an int)")
        return hf
    return normalize


TEXT = Family(
    model_type="clip_text_model",
    name="gpt",
    architectures=("CLIPTextModel",),
    keys={"vocab_size": "vocab_size", "hidden_size": "emb_dim", "num_hidden_layers": "num_layers",
          "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim", "layer_norm_eps": "norm_eps",
          "max_position_embeddings": "max_len"},
    fixed={"name": "gpt", "norm": "layernorm", "use_bias": True, "positions": "learned", "tie_embeddings": True,
           "scale_embeddings": False, "sliding_window": 0},
    activation=("hidden_act", ACTIVATIONS),
    stacks={"decoder": "num_hidden_layers"},
    rules=text_rules,
    init_inputs=lambda hf: dict(tokens=np.zeros((1, 1), np.int32)),
    hf_defaults={"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5, "eos_token_id": 49407},
    model_values=text_pooling,
    ignored=("embeddings.position_ids",),
)

VISION = Family(
    model_type="clip_vision_model",
    name="vit",
    architectures=("CLIPVisionModel",),
    keys={"hidden_size": "emb_dim", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
          "intermediate_size": "mlp_dim", "layer_norm_eps": "norm_eps", "image_size": "image_size",
          "patch_size": "patch_size"},
    fixed={"name": "vit", "norm": "layernorm", "use_bias": True, "pool": "cls", "pre_norm": True},
    activation=("hidden_act", ACTIVATIONS),
    stacks={"encoder": "num_hidden_layers"},
    rules=vision_rules,
    init_inputs=lambda hf: dict(images=np.zeros((1, hf["image_size"], hf["image_size"], hf["num_channels"]),
                                                np.float32)),
    hf_defaults={"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "num_channels": 3, "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu",
                 "layer_norm_eps": 1e-5},
    normalize=square_images("CLIP"),
    ignored=("embeddings.position_ids",),
    optional=("patch_embed/bias",),
)


def run_config(hf: dict) -> dict:
    """The run's values outside the towers: the task, and text rows as long as CLIP's context
    with images of its channels."""
    return {"task": {"name": "image_text", "contrastive_loss": "clip", "projection_dim": hf["projection_dim"]},
            "data": {"seq_len": hf["text_config"]["max_position_embeddings"],
                     "image_channels": hf["vision_config"]["num_channels"]}}


FAMILY = DualFamily(
    model_type="clip",
    architectures=("CLIPModel",),
    towers=(Tower(TEXT, "text_config", "text_model.", "model", "text"),
            Tower(VISION, "vision_config", "vision_model.", "image_model", "image")),
    rules=lambda hf: [*dense("text_projection", "text_projection", bias=False),
                      *dense("visual_projection", "image_projection", bias=False),
                      *copy("logit_scale", LOG_SCALE)],
    config=run_config,
    hf_defaults={"projection_dim": 512},
    task_params=(LOG_SCALE,),
    tokenizers=(("tokenizer.json", "huggingface"),),
)
