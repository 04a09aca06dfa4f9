"""The classic Flax MNIST example's CNN on `$JAXLM_DATA_DIR/mnist`.

    python -m jaxlm.main --config=configs/mnist_cnn.py --workdir=/tmp/mnist_cnn

Two conv + average-pool stages and two dense layers; AdamW, batch 128, 3 epochs (1,400 steps),
evaluated on the whole 10,000-image test split. `--config=configs/mnist_cnn.py:fashion` trains
on Fashion-MNIST instead (same files, same format).
"""

from jaxlm.config import default_config


def get_config(arg: str = "mnist"):
    config = default_config()
    config.task.name = "image_classification"
    config.data.update(dict(name={"mnist": "jaxlm_mnist", "fashion": "jaxlm_fashion_mnist"}[arg],
                            train_split="train", eval_split="test", augment="none"))
    config.model.update(dict(name="cnn"))
    config.train.update(dict(steps=1400, batch_size=128, log_every=100, eval_every=700,
                             eval_batches=0, steps_per_call=1))  # see step.repeat_steps
    config.optim.update(dict(lr=2e-3, end_lr=1e-5, warmup_steps=100, weight_decay=1e-4, b2=0.999))
    config.checkpoint.every = 700
    config.sample.max_new_tokens = 0
    return config
