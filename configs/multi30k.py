"""Multi30k English -> German translation with T5 (BLEU with sacrebleu), fine-tuning or from scratch.

    python -m jaxlm.main --config=configs/multi30k.py --workdir=/tmp/multi30k
    python -m jaxlm.main --config=configs/multi30k.py:lora --config.init_from=DIR --workdir=/tmp/multi30k_lora
    python -m jaxlm.evaluate --workdir=/tmp/multi30k     # bleu, predictions.jsonl
    python -m jaxlm.predict --workdir=/tmp/multi30k --text="A man is riding a bike."

The model, data and schedule of `configs/t5_multi30k.py` (a small T5, a 4000-piece sentencepiece
vocabulary, beam search 4). `init_from` names a pretrained T5 — a jaxlm run (e.g. of
`configs/t5_span_corruption.py` with the same tokenizer and shape) or a Hugging Face T5 folder —
and the argument picks the fine-tuning method (`full` trains from scratch when init_from is empty;
the others need a base).
"""

import importlib.util
import os

from jaxlm import peft

_spec = importlib.util.spec_from_file_location("t5_multi30k", os.path.join(os.path.dirname(__file__), "t5_multi30k.py"))
_t5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_t5)


def get_config(method: str = "full"):
    config = _t5.get_config()
    config.peft.update(dict(method=method, targets="attn/(query|value)|cross_attn/(query|value)"))
    if method != "full":
        config.optim.lr = peft.learning_rate(method)
    return config
