"""LoRA or QLoRA fine-tuning of a Llama-class decoder from Hugging Face (Llama, Mistral, Qwen2,
Qwen3, Gemma) as a causal language model on Tiny Shakespeare.

    python -m jaxlm.main --config=configs/llama_lora.py --config.init_from=HF_DIR --workdir=/tmp/llama_lora
    python -m jaxlm.main --config=configs/llama_lora.py:qlora --config.init_from=HF_DIR --workdir=/tmp/llama_qlora
    python tools/merge_lora.py --workdir=/tmp/llama_lora --output=/tmp/llama_merged
    python tools/convert_hf.py export --workdir=/tmp/llama_merged --hf_dir=/tmp/llama_merged_hf

HF_DIR is a folder with config.json, *.safetensors and tokenizer.json (the architecture and the
tokenizer come from it). LoRA r16 on every projection of attention and MLP; `qlora` keeps the base
frozen in NF4 (quantized at load). Data: `$JAXLM_DATA_DIR/tinyshakespeare/input.txt`, 90/10.
"""

from jaxlm.config import default_config


def get_config(method: str = "lora"):
    if method not in ("lora", "qlora"):
        raise ValueError(f"configs/llama_lora.py:{method}: expected lora or qlora")
    config = default_config()
    config.task.name = "causal_lm"
    config.data.update(dict(name="jaxlm_tiny_shakespeare", tokenizer="huggingface", seq_len=128))
    config.model.update(dict(dropout=0.0, scan_layers=True))
    if method == "qlora":
        config.model.quant.update(dict(weights="nf4", group_size=64, embeddings=False))
    config.peft.update(dict(method="lora", rank=16, alpha=32.0,
                            targets="attn/(query|key|value|out)|mlp/(wi|wg|wo)"))
    config.train.update(dict(steps=200, batch_size=8, log_every=10, eval_every=100, eval_batches=10))
    config.optim.update(dict(lr=1e-3, end_lr=1e-4, warmup_steps=20, weight_decay=0.0, clip_norm=1.0))
    config.checkpoint.every = 100
    config.sample.update(dict(prompt="ROMEO:", max_new_tokens=32))
    return config
