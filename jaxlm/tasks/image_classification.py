"""Image classification: softmax cross-entropy on the label of each image."""

import jax.numpy as jnp

from jaxlm.data import images
from jaxlm.tasks import base


class ImageClassification(base.Task):
    """Batches are `{'image': float32[b, h, w, c], 'label': int32[b], 'weight': float32[b]}`."""

    heads = (r"^head/",)  # the classifier trains under every PEFT method

    def __init__(self, config, tokenizer):
        super().__init__(config, tokenizer)
        d, m = config.data, config.model
        height, width, channels = images.image_shape(d.name, data_dir=d.data_dir)
        self.image_shape = (height, width, channels)
        classes = images.num_classes(d.name, data_dir=d.data_dir)
        if m.num_classes <= 0:
            m.num_classes = classes
        elif m.num_classes < classes:
            raise ValueError(f"model.num_classes={m.num_classes} but {d.name} has {classes} classes")
        if m.name == "vit":
            if height != width:
                raise ValueError(f"the ViT takes square images; {d.name} has {height}x{width}")
            m.image_size = m.image_size or height
            if m.image_size != height:
                raise ValueError(f"model.image_size={m.image_size} but {d.name} has {height}x{width} images")
            self.tokens_per_example = (height // m.patch_size) ** 2 + (m.pool == "cls")
        self.model = self.build_model()

    @classmethod
    def build_tokenizer(cls, config, workdir: str):
        return None

    def dummy_batch(self):
        return {"image": jnp.zeros((1, *self.image_shape), jnp.float32)}

    def model_inputs(self, batch):
        return {"images": batch["image"]}

    def loss(self, params, batch, rng=None, train: bool = False):
        logits = self.model.apply({"params": params}, **self.model_inputs(batch),
                                  deterministic=not train, rngs=self.rngs(rng, train))
        loss, correct, weight = base.cross_entropy(logits, batch["label"], batch.get("weight"))
        return loss, {"loss": loss, "correct": correct, "weight": weight}

    summarize = staticmethod(base.mean_metrics)

    def data_kwargs(self, split: str) -> dict:
        d = self.config.data
        return dict(name=d.name, split=split, global_batch_size=self.config.train.batch_size,
                    data_dir=d.data_dir, **self.process_kwargs())

    def train_iterator(self):
        c = self.config
        return images.train_iterator(seed=c.seed, augment=c.data.augment, **self.data_kwargs(c.data.train_split))

    def eval_batches(self, split: str, max_batches: int):
        return images.eval_batches(max_batches=max_batches, **self.data_kwargs(split))
