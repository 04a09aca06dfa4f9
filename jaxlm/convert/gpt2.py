"""GPT-2 (`GPT2LMHeadModel`, `GPT2Model`) <-> jaxlm `gpt`.

GPT-2's Conv1D weights are [in, out] (no transpose) and `c_attn` packs q, k, v side by side.
"""

import numpy as np

from jaxlm.convert.rules import ACTIVATIONS, Family, copy, dense, norm


def rules(hf: dict):
    hf_layer, ours = "h.{i}", "decoder/layers_{i}"
    qkv = tuple(f"{ours}/attn/{name}" for name in ("query", "key", "value"))
    table = [
        *copy("wte.weight", "embed/embedding"),
        *copy("wpe.weight", "pos_embedding"),
        *norm(f"{hf_layer}.ln_1", f"{ours}/attn_norm"),
        *dense(f"{hf_layer}.attn.c_attn", qkv, conv=True),
        *dense(f"{hf_layer}.attn.c_proj", f"{ours}/attn/out", conv=True, n_in=2),
        *norm(f"{hf_layer}.ln_2", f"{ours}/mlp_norm"),
        *dense(f"{hf_layer}.mlp.c_fc", f"{ours}/mlp/wi", conv=True),
        *dense(f"{hf_layer}.mlp.c_proj", f"{ours}/mlp/wo", conv=True),
        *norm("ln_f", "final_norm"),
    ]
    return table if hf["tie_word_embeddings"] else table + dense("lm_head", "lm_head", bias=False)


def normalize(hf: dict) -> dict:
    return {**hf, "n_inner": hf["n_inner"] or 4 * hf["n_embd"]}


FAMILY = Family(
    model_type="gpt2",
    name="gpt",
    architectures=("GPT2LMHeadModel", "GPT2Model"),
    keys={"vocab_size": "vocab_size", "n_embd": "emb_dim", "n_layer": "num_layers",
          "n_head": "num_heads", "n_inner": "mlp_dim", "n_positions": "max_len",
          "layer_norm_epsilon": "norm_eps", "tie_word_embeddings": "tie_embeddings"},
    fixed={"name": "gpt", "norm": "layernorm", "use_bias": True, "positions": "learned",
           "scale_embeddings": False, "sliding_window": 0, "causal": True},
    activation=("activation_function", ACTIVATIONS),
    stacks={"decoder": "n_layer"},
    rules=rules,
    init_inputs=lambda hf: dict(tokens=np.zeros((1, 1), np.int32)),
    hf_defaults={"n_inner": None, "n_positions": 1024, "layer_norm_epsilon": 1e-5,
                 "activation_function": "gelu_new", "tie_word_embeddings": True},
    required={"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
              "add_cross_attention": False},
    normalize=normalize,
    tied=lambda hf: {"lm_head.weight": "wte.weight"},
    # The causal-mask buffers older transformers saved with each layer.
    ignored=("h.{i}.attn.bias", "h.{i}.attn.masked_bias"),
    prefix="transformer.",
    top_level=("lm_head.",),
    tokenizers=(("tokenizer.json", "huggingface"),),
)
