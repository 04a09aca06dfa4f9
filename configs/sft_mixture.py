"""Instruction tuning of a small Llama-style decoder on a mixture of three tasks, packed.

    python tools/make_instructions.py --output=/tmp/instructions
    python -m jaxlm.main --config=configs/sft_mixture.py --workdir=/tmp/sft
    python -m jaxlm.evaluate --workdir=/tmp/sft        # per-task metrics by generation, predictions.jsonl
    python -m jaxlm.main --config=configs/sft_mixture.py:lora --config.init_from=/tmp/sft_base --workdir=/tmp/sft_lora

The mixture (`tools/make_instructions.py`): Multi30k translation (BLEU), SST-2 sentiment
(accuracy) and CoNLL-2003 entities written as text (entity F1), as JSONL chat conversations in
`/tmp/instructions` (`--config.data.files='train=PATH,validation=PATH'` for others). The loss
covers the assistant's answers only; conversations are packed into rows of 256 tokens. The
decoder is Llama-shaped (RMSNorm, SwiGLU, rotary positions, grouped-query attention) with a
4000-piece sentencepiece vocabulary trained on the train conversations; `:lora` trains LoRA r16
on every projection of a base given by `init_from` (the same shape and tokenizer, e.g. a
`causal_lm` run on the mixture's text, or a full `sft` run) instead of every weight.
"""

from jaxlm import peft
from jaxlm.config import default_config

INSTRUCTIONS = "/tmp/instructions"


def get_config(method: str = "full"):
    if method not in ("full", "lora"):
        raise ValueError(f"configs/sft_mixture.py:{method}: expected full or lora")
    config = default_config()
    config.task.update(dict(name="sft", task_metrics="translate=bleu,sentiment=accuracy,entities=entity_f1",
                            eval_generate=0, generate_tokens=64))
    config.data.update(dict(name="sft_jsonl", files=f"train={INSTRUCTIONS}/train.jsonl,"
                                                    f"validation={INSTRUCTIONS}/validation.jsonl",
                            tokenizer="sentencepiece", tokenizer_vocab_size=4000, seq_len=256))
    config.model.update(dict(name="gpt", norm="rmsnorm", positions="rotary", mlp="swiglu", tie_embeddings=True,
                             num_layers=4, emb_dim=256, num_heads=8, num_kv_heads=2, mlp_dim=768, max_len=320,
                             dropout=0.0))
    config.train.update(dict(steps=1500, batch_size=16, log_every=50, eval_every=750, eval_batches=0))
    config.optim.update(dict(lr=2e-3, end_lr=1e-4, warmup_steps=100, b2=0.98, weight_decay=0.01, clip_norm=1.0))
    config.checkpoint.every = 500
    config.peft.update(dict(method=method, rank=16, alpha=32.0, targets="attn/(query|key|value|out)|mlp/(wi|wg|wo)"))
    if method != "full":
        config.optim.lr = peft.learning_rate(method)
    config.sample.max_new_tokens = 1  # > 0: print three answers at the end
    return config
