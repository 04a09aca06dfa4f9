"""The Llama-class decoders (Llama, Mistral, Qwen2, Qwen3, Gemma 1, 2, 3) <-> jaxlm `gpt`.

All five share one tensor layout (`model.layers.{i}.self_attn.{q,k,v,o}_proj`, a gated MLP of
`gate_proj`/`up_proj`/`down_proj`, RMSNorms before each branch) and rotary positions whose
halves layout is jaxlm's, so the weights copy without permutation. What differs is one jaxlm
knob each: Mistral's `sliding_window`, Qwen2's `qkv_bias`, Qwen3's `qk_norm`, Gemma's
`scale_embeddings` and zero-centred `rmsnorm_plus_one` with a tied output layer; Gemma 2 adds
`post_branch_norm`, soft-capped logits (`attn_softcap`, `logit_softcap`), `query_pre_attn_scalar`
and local/global layers (`sliding_window_pattern`, from `layer_types`); Gemma 3 has no caps but
q/k norms and a rotary base of its own for the local layers (`local_rope_theta`).

Rotary settings are read from `rope_parameters` (transformers 5) or from the older `rope_theta`
and `rope_scaling` keys that most published config.json files still carry.
"""

import dataclasses

import numpy as np

from jaxlm.convert.rules import Family, attention, copy, dense, norm

# rope_type -> jaxlm model.rope_scaling.type ("default": plain rotary).
ROPE_TYPES = {"default": "none", "linear": "linear", "llama3": "llama3"}


GEMMA_2_3 = ("gemma2", "gemma3_text")
# Gemma 2/3's four norms per layer -> jaxlm's (Llama's post_attention_layernorm is the MLP's input norm).
SANDWICH_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_post_norm",
                  "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_post_norm"}


def rules(hf: dict):
    hf_layer, ours = "layers.{i}", "decoder/layers_{i}"
    norms = (SANDWICH_NORMS if hf["model_type"] in GEMMA_2_3
             else {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"})
    table = [
        *copy("embed_tokens.weight", "embed/embedding"),
        *[rule for theirs, mine in norms.items()
          for rule in norm(f"{hf_layer}.{theirs}", f"{ours}/{mine}", bias=False)],
        *attention(f"{hf_layer}.self_attn", f"{hf_layer}.self_attn.o_proj", f"{ours}/attn",
                   names=("q_proj", "k_proj", "v_proj"), bias=False),
        *dense(f"{hf_layer}.mlp.gate_proj", f"{ours}/mlp/wg", bias=False),
        *dense(f"{hf_layer}.mlp.up_proj", f"{ours}/mlp/wi", bias=False),
        *dense(f"{hf_layer}.mlp.down_proj", f"{ours}/mlp/wo", bias=False),
        *norm("norm", "final_norm", bias=False),
    ]
    if hf["model_type"] == "qwen2":
        table += [rule for name, mine in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))
                  for rule in dense(f"{hf_layer}.self_attn.{name}", f"{ours}/attn/{mine}")[1:]]
    if hf["model_type"] in ("qwen3", "gemma3_text"):
        table += norm(f"{hf_layer}.self_attn.q_norm", f"{ours}/attn/query_norm", bias=False)
        table += norm(f"{hf_layer}.self_attn.k_norm", f"{ours}/attn/key_norm", bias=False)
    return table if hf["tie_word_embeddings"] else table + dense("lm_head", "lm_head", bias=False)


def rope_scaling(hf: dict) -> tuple[float, dict]:
    """(rope_theta, jaxlm model.rope_scaling) from either form of the HF rotary settings (of the
    global layers, where Gemma 3's differ by layer type)."""
    rope = hf.get("rope_parameters") or {**(hf.get("rope_scaling") or {}),
                                         "rope_theta": hf.get("rope_theta", 10000.0)}
    rope = rope.get("full_attention", rope)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_type={kind!r} is not supported by jaxlm (only {sorted(ROPE_TYPES)})")
    scaling = dict(type=ROPE_TYPES[kind], factor=float(rope.get("factor", 1.0)),
                   low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                   high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
                   original_max_len=int(rope.get("original_max_position_embeddings", 8192)))
    return float(rope["rope_theta"]), scaling


def normalize(hf: dict) -> dict:
    theta, scaling = rope_scaling(hf)
    heads = hf["num_attention_heads"]
    return {**hf, "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads,
            "num_key_value_heads": hf.get("num_key_value_heads") or heads,
            "sliding_window": hf.get("sliding_window") or 0,
            "rope_theta": theta, "rope_scaling": scaling}


def rope_parameters(model: dict) -> dict:
    scaling = model["rope_scaling"]
    rope = {"rope_type": next(hf for hf, ours in ROPE_TYPES.items() if ours == scaling["type"]),
            "rope_theta": model["rope_theta"]}
    if scaling["type"] != "none":
        rope["factor"] = scaling["factor"]
    if scaling["type"] == "llama3":
        rope.update(low_freq_factor=scaling["low_freq_factor"], high_freq_factor=scaling["high_freq_factor"],
                    original_max_position_embeddings=scaling["original_max_len"])
    return rope


def to_hf(model: dict, params: dict) -> dict:
    return {"rope_parameters": rope_parameters(model)}


def _model_values(hf: dict) -> dict:
    return {"rope_scaling": hf["rope_scaling"]}


def sliding_window_pattern(hf: dict) -> int:
    """N where every Nth layer of `layer_types` is 'full_attention' and the others
    'sliding_attention' (N > depth: no global layer); older files give N itself."""
    types = hf.get("layer_types")
    if not types:
        return int(hf["sliding_window_pattern"])
    n = types.index("full_attention") + 1 if "full_attention" in types else len(types) + 1
    if types != layer_types(n, len(types)):
        raise ValueError(f"layer_types={types} is not every Nth layer global: jaxlm's local/global "
                         "layers follow one period (model.sliding_window_pattern)")
    return n


def layer_types(pattern: int, depth: int) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(depth)]


def normalize_gemma_2_3(hf: dict) -> dict:
    """Off soft caps are None in HF, 0 in jaxlm; Gemma 3's local layers have a rotary base of their own."""
    hf = normalize(hf)
    rope = hf.get("rope_parameters") or {}
    local = rope.get("sliding_attention", {}).get("rope_theta", hf.get("rope_local_base_freq", 0.0))
    return {**hf, "attn_logit_softcapping": hf.get("attn_logit_softcapping") or 0.0,
            "final_logit_softcapping": hf.get("final_logit_softcapping") or 0.0,
            "sliding_window_pattern": sliding_window_pattern(hf), "local_rope_theta": float(local)}


def gemma_2_3_to_hf(model: dict, params: dict) -> dict:
    rope = rope_parameters(model)
    if model["local_rope_theta"]:
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                              "rope_theta": model["local_rope_theta"]}}
    scalar = float(model["query_pre_attn_scalar"] or model["head_dim"])
    pattern = model["sliding_window_pattern"] or (model["num_layers"] + 1 if model["sliding_window"] else 1)
    return {"rope_parameters": rope, "layer_types": layer_types(pattern, model["num_layers"]),
            "query_pre_attn_scalar": int(scalar) if scalar.is_integer() else scalar,  # transformers wants an int
            "attn_logit_softcapping": model["attn_softcap"] or None,
            "final_logit_softcapping": model["logit_softcap"] or None}


def _gemma_2_3_values(hf: dict) -> dict:
    return {**_model_values(hf), "sliding_window_pattern": hf["sliding_window_pattern"],
            "local_rope_theta": hf["local_rope_theta"], "scan_layers": False}  # local and global layers differ


LLAMA = Family(
    model_type="llama",
    name="gpt",
    architectures=("LlamaForCausalLM", "LlamaModel"),
    keys={"vocab_size": "vocab_size", "hidden_size": "emb_dim", "num_hidden_layers": "num_layers",
          "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
          "head_dim": "head_dim", "intermediate_size": "mlp_dim", "max_position_embeddings": "max_len",
          "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
          "tie_word_embeddings": "tie_embeddings"},
    fixed={"name": "gpt", "norm": "rmsnorm", "use_bias": False, "positions": "rotary",
           "scale_queries": True, "qkv_bias": False, "qk_norm": False, "scale_embeddings": False,
           "sliding_window": 0, "post_branch_norm": False, "attn_softcap": 0.0, "logit_softcap": 0.0,
           "query_pre_attn_scalar": 0.0, "sliding_window_pattern": 0, "local_rope_theta": 0.0},
    activation=("hidden_act", {"silu": "swiglu"}),
    stacks={"decoder": "num_hidden_layers"},
    rules=rules,
    init_inputs=lambda hf: dict(tokens=np.zeros((1, 1), np.int32)),
    hf_defaults={"hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
                 "tie_word_embeddings": False},
    required={"attention_bias": False, "mlp_bias": False},
    normalize=normalize,
    to_hf=to_hf,
    model_values=_model_values,
    tied=lambda hf: {"lm_head.weight": "embed_tokens.weight"},
    ignored=("layers.{i}.self_attn.rotary_emb.inv_freq",),
    prefix="model.",
    top_level=("lm_head.",),
    tokenizers=(("tokenizer.json", "huggingface"),),
)


def _variant(base: Family, **changes) -> Family:
    fixed = {**base.fixed, **changes.pop("fixed", {})}
    return dataclasses.replace(base, fixed=fixed, **changes)


# Mistral's window is a config value, not fixed: a jaxlm model without one exports as Llama.
MISTRAL = dataclasses.replace(
    LLAMA, model_type="mistral", architectures=("MistralForCausalLM", "MistralModel"),
    keys={**LLAMA.keys, "sliding_window": "sliding_window"},
    fixed={k: v for k, v in LLAMA.fixed.items() if k != "sliding_window"}, required={},
    hf_defaults={**LLAMA.hf_defaults, "max_position_embeddings": 4096 * 32, "sliding_window": 4096})
QWEN2 = _variant(
    LLAMA, model_type="qwen2", architectures=("Qwen2ForCausalLM", "Qwen2Model"),
    fixed={"qkv_bias": True}, required={"use_sliding_window": False},
    hf_defaults={**LLAMA.hf_defaults, "max_position_embeddings": 32768})
QWEN3 = _variant(
    LLAMA, model_type="qwen3", architectures=("Qwen3ForCausalLM", "Qwen3Model"),
    fixed={"qk_norm": True}, required={"use_sliding_window": False, "attention_bias": False},
    hf_defaults={**LLAMA.hf_defaults, "max_position_embeddings": 32768, "head_dim": 128})
GEMMA = _variant(
    LLAMA, model_type="gemma", architectures=("GemmaForCausalLM", "GemmaModel"),
    fixed={"norm": "rmsnorm_plus_one", "scale_embeddings": True},
    activation=("hidden_act", {"gelu_pytorch_tanh": "geglu", "gelu": "geglu"}),
    hf_defaults={**LLAMA.hf_defaults, "hidden_act": "gelu_pytorch_tanh", "max_position_embeddings": 8192,
                 "head_dim": 256, "tie_word_embeddings": True})
GEMMA2 = dataclasses.replace(
    GEMMA, model_type="gemma2", architectures=("Gemma2ForCausalLM", "Gemma2Model"),
    keys={**LLAMA.keys, "sliding_window": "sliding_window", "query_pre_attn_scalar": "query_pre_attn_scalar",
          "attn_logit_softcapping": "attn_softcap", "final_logit_softcapping": "logit_softcap"},
    fixed={**{k: v for k, v in GEMMA.fixed.items() if k not in (
        "sliding_window", "query_pre_attn_scalar", "attn_softcap", "logit_softcap", "sliding_window_pattern")},
        "post_branch_norm": True},
    activation=("hidden_activation", GEMMA.activation[1]),
    hf_defaults={**GEMMA.hf_defaults, "hidden_activation": "gelu_pytorch_tanh", "sliding_window": 4096,
                 "query_pre_attn_scalar": 256, "sliding_window_pattern": 2},
    normalize=normalize_gemma_2_3, to_hf=gemma_2_3_to_hf, model_values=_gemma_2_3_values)
GEMMA3 = dataclasses.replace(
    GEMMA2, model_type="gemma3_text", architectures=("Gemma3ForCausalLM", "Gemma3TextModel"),
    fixed={**{k: v for k, v in GEMMA2.fixed.items() if k != "local_rope_theta"}, "qk_norm": True},
    hf_defaults={**GEMMA2.hf_defaults, "sliding_window_pattern": 6, "max_position_embeddings": 131072})

FAMILIES = (LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA, GEMMA2, GEMMA3)
