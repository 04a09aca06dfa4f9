"""Llama 3 architectures on the one core, pretrained from scratch as causal language models.

    python -m jaxlm.main --config=configs/llama3.py:tiny --workdir=/tmp/llama_tiny
    python tools/memory_estimate.py --config=configs/llama3.py:8b --cpu_devices=256 \
        --meshes="fsdp=8;fsdp=64,tensor=4" --remat=none,full

`1b` is Meta's Llama 3.2 1B shape (tied embeddings); `8b` and `70b` are Meta's Llama 3.1 shapes (grouped-query attention with 8 key/value heads,
SwiGLU, RMSNorm, rotary with theta 500000 and the llama3 frequency scaling, 128256-token
vocabulary, bfloat16 compute over float32 parameters) at 8192 tokens per sequence, one sequence
per data shard; they are for pods (and memory estimates here). `tiny` keeps the recipe at a size
this machine trains: 4 layers, width 256, on Tiny Shakespeare with the byte tokenizer. To start
from Meta's weights instead, import them (`tools/convert_hf.py import`, or
`--config.init_from=HF_DIR` with configs/llama_lora.py).
"""

from jaxlm.config import default_config

SIZES = {
    "tiny": dict(num_layers=4, emb_dim=256, num_heads=8, num_kv_heads=2, mlp_dim=768, max_len=256),
    "1b": dict(num_layers=16, emb_dim=2048, num_heads=32, num_kv_heads=8, mlp_dim=8192,
               vocab_size=128256, max_len=8192, tie_embeddings=True),
    "8b": dict(num_layers=32, emb_dim=4096, num_heads=32, num_kv_heads=8, mlp_dim=14336,
               vocab_size=128256, max_len=8192),
    "70b": dict(num_layers=80, emb_dim=8192, num_heads=64, num_kv_heads=8, mlp_dim=28672,
                vocab_size=128256, max_len=8192),
}


def get_config(size: str = "tiny"):
    if size not in SIZES:
        raise ValueError(f"configs/llama3.py:{size}: expected one of {sorted(SIZES)}")
    config = default_config()
    config.task.name = "causal_lm"
    config.data.update(dict(name="jaxlm_tiny_shakespeare", tokenizer="byte"))
    config.model.update(dict(name="gpt", norm="rmsnorm", norm_eps=1e-5, positions="rotary", rope_theta=500000.0,
                             mlp="swiglu", tie_embeddings=False, dropout=0.0, vocab_multiple=128))
    config.model.update(SIZES[size])
    config.model.rope_scaling.update(dict(type="llama3", factor=32.0 if size == "1b" else 8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_len=8192))
    config.optim.update(dict(lr=3e-4 if size != "tiny" else 1e-3, end_lr=3e-5, warmup_steps=100, b2=0.95,
                             weight_decay=0.1, clip_norm=1.0))
    if size == "tiny":
        config.data.seq_len = 256
        config.train.update(dict(steps=2000, batch_size=16, log_every=50, eval_every=500, eval_batches=20))
    else:
        config.model.update(dict(dtype="bfloat16", remat="full"))
        config.data.seq_len = 8192
        config.train.update(dict(steps=100000, batch_size=8, eval_every=1000))
    config.sample.update(dict(prompt="ROMEO:", max_new_tokens=64))
    return config
