"""A small ViT on `$JAXLM_DATA_DIR/mnist`: 7x7 patches, class token, 6 pre-norm layers.

    python -m jaxlm.main --config=configs/mnist_vit.py --workdir=/tmp/mnist_vit

16 patches + [CLS] of width 128, 6 layers, 4 heads, random 2-pixel shifts, AdamW with warm-up
and cosine decay, batch 128 for 6 epochs, evaluated on the whole 10,000-image test split.
`--config=configs/mnist_vit.py:fashion` trains on Fashion-MNIST.
"""

from jaxlm.config import default_config


def get_config(arg: str = "mnist"):
    config = default_config()
    config.task.name = "image_classification"
    config.data.update(dict(name={"mnist": "jaxlm_mnist", "fashion": "jaxlm_fashion_mnist"}[arg],
                            train_split="train", eval_split="test", augment="shift"))
    config.model.update(dict(name="vit", patch_size=7, pool="cls", num_layers=6, num_heads=4,
                             emb_dim=128, mlp_dim=256, mlp="gelu_exact", use_bias=True,
                             norm_eps=1e-6, dropout=0.0, scan_layers=False))
    config.train.update(dict(steps=2800, batch_size=128, log_every=100, eval_every=1400,
                             eval_batches=0, steps_per_call=50))
    config.optim.update(dict(lr=1e-3, end_lr=1e-5, warmup_steps=300, weight_decay=0.05, b2=0.999))
    config.checkpoint.every = 1400
    config.sample.max_new_tokens = 0
    return config
