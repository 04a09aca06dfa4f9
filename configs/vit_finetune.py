"""Transfer: fine-tune a ViT trained on MNIST (`configs/mnist_vit.py`) on Fashion-MNIST.

    python -m jaxlm.main --config=configs/mnist_vit.py --workdir=/tmp/mnist_vit
    python -m jaxlm.main --config=configs/vit_finetune.py --config.init_from=/tmp/mnist_vit --workdir=/tmp/vit_ft
    python -m jaxlm.main --config=configs/vit_finetune.py:lora --config.init_from=/tmp/mnist_vit --workdir=/tmp/vit_lora

The backbone comes from `init_from`; the classifier head starts fresh (`init_skip`), and the
argument picks the fine-tuning method (`full`, `lora`, `adapter`, `prompt`, `prefix`, `bitfit`,
`head`) with its learning rate. LoRA here targets every attention and MLP projection.
"""

import importlib.util
import os

from jaxlm import peft

_spec = importlib.util.spec_from_file_location("mnist_vit", os.path.join(os.path.dirname(__file__), "mnist_vit.py"))
_vit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_vit)


def get_config(method: str = "full"):
    config = _vit.get_config("fashion")
    config.init_skip = "^head/"
    config.peft.update(dict(method=method, targets="attn/(query|key|value|out)|mlp/(wi|wo)"))
    config.train.update(dict(steps=1000, eval_every=500))
    # A small ViT fine-tunes well at 3e-4 (full); the PEFT methods at their usual rates.
    config.optim.update(dict(lr=3e-4 if method == "full" else peft.learning_rate(method), warmup_steps=100))
    config.checkpoint.every = 500
    return config
