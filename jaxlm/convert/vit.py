"""ViT (`ViTForImageClassification`, `ViTModel` without pooler) <-> jaxlm `vit`.

HF ViT's encoder layer is BERT's with pre-norm (`layernorm_before`, `layernorm_after`).
"""

import numpy as np

from jaxlm.convert.bert import encoder_layer
from jaxlm.convert.rules import ACTIVATIONS, Family, Patches, Rule, copy, dense, norm

PATCHES = "embeddings.patch_embeddings.projection"


def rules(hf: dict):
    return [
        *copy("embeddings.cls_token", "cls"),
        *copy("embeddings.position_embeddings", "pos_embedding", hf_lead=1),
        Rule(f"{PATCHES}.weight", ("patch_embed/kernel",), Patches(hf["patch_size"], hf["num_channels"])),
        *copy(f"{PATCHES}.bias", "patch_embed/bias"),
        *encoder_layer("attention.attention", "layernorm_before", "layernorm_after"),
        *norm("layernorm", "final_norm"),
        *dense("classifier", "head"),
    ]


def normalize(hf: dict) -> dict:
    for key in ("image_size", "patch_size"):
        if not isinstance(hf[key], int):
            raise ValueError(f"ViT config {key}={hf[key]!r}: jaxlm's ViT takes square images (an int)")
    labels = hf.get("id2label")
    return {**hf, "num_labels": len(labels) if labels else hf["num_labels"]}


def to_hf(model: dict, params: dict) -> dict:
    rows = params["patch_embed/kernel"].shape[0]
    return {"num_channels": rows // model["patch_size"] ** 2}


def init_inputs(hf: dict) -> dict:
    size = hf["image_size"]
    return dict(images=np.zeros((1, size, size, hf["num_channels"]), np.float32))


FAMILY = Family(
    model_type="vit",
    name="vit",
    architectures=("ViTForImageClassification", "ViTModel"),
    keys={"hidden_size": "emb_dim", "num_hidden_layers": "num_layers",
          "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim",
          "layer_norm_eps": "norm_eps", "image_size": "image_size", "patch_size": "patch_size",
          "num_labels": "num_classes"},
    fixed={"name": "vit", "norm": "layernorm", "use_bias": True, "pool": "cls"},
    activation=("hidden_act", ACTIVATIONS),
    stacks={"encoder": "num_hidden_layers"},
    rules=rules,
    init_inputs=init_inputs,
    hf_defaults={"hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 224, "patch_size": 16,
                 "num_channels": 3, "num_labels": 2},
    required={"qkv_bias": True},
    normalize=normalize,
    to_hf=to_hf,
    prefix="vit.",
    top_level=("classifier.",),
    heads=("head",),
    optional=("head",),
)
