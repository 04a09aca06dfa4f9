"""T5 (`T5ForConditionalGeneration`: T5 v1.0 and the gated T5.1.1) <-> jaxlm `t5`.

Tied embeddings mean what they meant in the original T5: the output layer is the embedding table
and the decoder output is rescaled by d_model**-0.5 first. transformers 5 keeps that rescale as
`scale_decoder_outputs` (from `tie_word_embeddings` of older configs) and always ties the output
layer unless the file holds its own `lm_head.weight`; jaxlm's `tie_embeddings` is the rescale.
"""

import numpy as np

from jaxlm.convert.rules import Family, attention, copy, dense, norm

# feed_forward_proj -> jaxlm model.mlp ("gated-gelu" is the tanh GELU, "gelu" the exact one).
FEED_FORWARD = {"relu": "relu", "gelu": "gelu_exact", "gelu_new": "gelu", "gated-gelu": "geglu",
                "gated-silu": "swiglu"}


def _block(stack: str, gated: bool):
    """The rules of one layer of `stack` ('encoder' or 'decoder': + cross-attention)."""
    hf, ours = f"{stack}.block.{{i}}", f"{stack}/layers_{{i}}"
    branches = [("SelfAttention", "attn", "attn_norm")]
    if stack == "decoder":
        branches.append(("EncDecAttention", "cross_attn", "cross_norm"))
    table = []
    for j, (hf_attn, mine, mine_norm) in enumerate(branches):
        table += attention(f"{hf}.layer.{j}.{hf_attn}", f"{hf}.layer.{j}.{hf_attn}.o", f"{ours}/{mine}",
                           names=("q", "k", "v"), bias=False)
        table += norm(f"{hf}.layer.{j}.layer_norm", f"{ours}/{mine_norm}", bias=False)
    mlp = f"{hf}.layer.{len(branches)}.DenseReluDense"
    if gated:  # activation(x @ wi_0) * (x @ wi_1): jaxlm's activation(x @ wg) * (x @ wi)
        table += dense(f"{mlp}.wi_0", f"{ours}/mlp/wg", bias=False)
        table += dense(f"{mlp}.wi_1", f"{ours}/mlp/wi", bias=False)
    else:
        table += dense(f"{mlp}.wi", f"{ours}/mlp/wi", bias=False)
    table += dense(f"{mlp}.wo", f"{ours}/mlp/wo", bias=False)
    return table + norm(f"{hf}.layer.{len(branches)}.layer_norm", f"{ours}/mlp_norm", bias=False)


def rules(hf: dict):
    gated = hf["feed_forward_proj"].startswith("gated-")
    table = copy("shared.weight", "embed/embedding")
    for stack in ("encoder", "decoder"):
        table += _block(stack, gated)
        table += copy(f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                      f"{stack}_bias/embedding")
        table += norm(f"{stack}.final_layer_norm", f"{stack}_norm", bias=False)
    return table if hf["scale_decoder_outputs"] else table + dense("lm_head", "lm_head", bias=False)


def normalize(hf: dict) -> dict:
    scale = hf.get("scale_decoder_outputs", hf["tie_word_embeddings"] is not False)
    return {**hf, "num_decoder_layers": hf["num_decoder_layers"] or hf["num_layers"],
            "scale_decoder_outputs": scale}


def init_inputs(hf: dict) -> dict:
    ids = np.ones((1, 1), np.int32)
    return dict(encoder_tokens=ids, decoder_tokens=ids)


FAMILY = Family(
    model_type="t5",
    name="t5",
    architectures=("T5ForConditionalGeneration", "T5ForConditionalGeneration"),
    keys={"vocab_size": "vocab_size", "d_model": "emb_dim", "num_layers": "num_layers",
          "num_decoder_layers": "num_decoder_layers", "num_heads": "num_heads", "d_kv": "head_dim",
          "d_ff": "mlp_dim", "layer_norm_epsilon": "norm_eps",
          "relative_attention_num_buckets": "relative_buckets",
          "relative_attention_max_distance": "relative_max_distance",
          "scale_decoder_outputs": "tie_embeddings"},
    fixed={"name": "t5", "norm": "rmsnorm", "use_bias": False, "scale_queries": False, "scale_embeddings": False,
           "positions": "learned"},  # T5 has relative biases only: its "learned" is the default, no table
    activation=("feed_forward_proj", FEED_FORWARD),
    stacks={"encoder": "num_layers", "decoder": "num_decoder_layers"},
    rules=rules,
    init_inputs=init_inputs,
    hf_defaults={"d_kv": 64, "num_decoder_layers": None, "layer_norm_epsilon": 1e-6,
                 "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                 "feed_forward_proj": "relu", "tie_word_embeddings": True},
    normalize=normalize,
    # What transformers 4 read as both "tie the output layer" and "rescale before it".
    to_hf=lambda model, params: {"tie_word_embeddings": model["tie_embeddings"],
                                 "is_encoder_decoder": True, "decoder_start_token_id": 0},
    tied=lambda hf: {"encoder.embed_tokens.weight": "shared.weight",
                     "decoder.embed_tokens.weight": "shared.weight", "lm_head.weight": "shared.weight"},
    # Old checkpoints carry a cross-attention position bias that T5 never uses.
    ignored=("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",),
    tokenizers=(("spiece.model", "sentencepiece"),),
)
