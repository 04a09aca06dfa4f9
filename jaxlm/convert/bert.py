"""BERT (`BertModel`, `BertForPreTraining`) <-> jaxlm `bert`."""

import numpy as np

from jaxlm.convert.rules import Family, attention, copy, dense, norm


def encoder_layer(attention_block: str, attn_norm: str, mlp_norm: str):
    """The rules of one BERT-style encoder layer (ViT's too, which names its norms otherwise)."""
    hf, ours = "encoder.layer.{i}", "encoder/layers_{i}"
    return [*attention(f"{hf}.{attention_block}", f"{hf}.attention.output.dense", f"{ours}/attn"),
            *norm(f"{hf}.{attn_norm}", f"{ours}/attn_norm"),
            *dense(f"{hf}.intermediate.dense", f"{ours}/mlp/wi"),
            *dense(f"{hf}.output.dense", f"{ours}/mlp/wo"),
            *norm(f"{hf}.{mlp_norm}", f"{ours}/mlp_norm")]


def rules(hf: dict):
    return [
        *copy("embeddings.word_embeddings.weight", "embed/embedding"),
        *copy("embeddings.position_embeddings.weight", "pos_embedding"),
        *copy("embeddings.token_type_embeddings.weight", "type_embedding"),
        *norm("embeddings.LayerNorm", "embed_norm"),
        *encoder_layer("attention.self", "attention.output.LayerNorm", "output.LayerNorm"),
        *dense("pooler.dense", "pooler"),
        *dense("cls.predictions.transform.dense", "mlm_transform"),
        *norm("cls.predictions.transform.LayerNorm", "mlm_norm"),
        *copy("cls.predictions.bias", "mlm_bias"),
        *dense("cls.seq_relationship", "nsp"),
    ]


def init_inputs(hf: dict) -> dict:
    ids = np.zeros((1, 1), np.int32)
    return dict(input_ids=ids, mlm_positions=ids)


FAMILY = Family(
    model_type="bert",
    name="bert",
    architectures=("BertForPreTraining", "BertModel"),
    keys={"vocab_size": "vocab_size", "hidden_size": "emb_dim", "num_hidden_layers": "num_layers",
          "num_attention_heads": "num_heads", "intermediate_size": "mlp_dim",
          "layer_norm_eps": "norm_eps", "max_position_embeddings": "max_len",
          "type_vocab_size": "type_vocab_size"},
    fixed={"name": "bert", "norm": "layernorm", "use_bias": True, "positions": "learned"},
    # jaxlm's masked-LM transform is the exact GELU whatever `model.mlp` says.
    activation=("hidden_act", {"gelu": "gelu_exact"}),
    stacks={"encoder": "num_hidden_layers"},
    rules=rules,
    init_inputs=init_inputs,
    hf_defaults={"hidden_act": "gelu", "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                 "type_vocab_size": 2},
    required={"position_embedding_type": "absolute", "is_decoder": False,
              "add_cross_attention": False, "tie_word_embeddings": True},
    tied=lambda hf: {"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
                     "cls.predictions.decoder.bias": "cls.predictions.bias"},
    ignored=("embeddings.position_ids", "embeddings.token_type_ids"),
    prefix="bert.",
    top_level=("cls.",),
    heads=("mlm_transform", "mlm_norm", "mlm_bias", "nsp"),
    optional=("pooler", "mlm_transform", "mlm_norm", "mlm_bias", "nsp"),
    tokenizers=(("vocab.txt", "wordpiece"),),
)
