"""The small CNN of the classic Flax MNIST example: two conv + average-pool stages, two dense."""

import flax.linen as nn
import jax.numpy as jnp


def _partitioned(axes):
    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes)


class CNN(nn.Module):
    num_classes: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, deterministic: bool = True):
        """Logits [batch, num_classes] (float32) for images [batch, height, width, channels]."""
        x = images.astype(self.dtype)
        for features in (32, 64):
            x = nn.Conv(features, (3, 3), dtype=self.dtype, kernel_init=_partitioned((None, None, None, "mlp")),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(256, dtype=self.dtype, kernel_init=_partitioned(("embed", "mlp")),
                             bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_partitioned(("mlp", None)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (None,)))(x)
        return logits.astype(jnp.float32)


def from_config(m, pipeline=None) -> CNN:
    if pipeline is not None:
        raise ValueError("the CNN has no layer stack to pipeline: use mesh.stage=1")
    if m.num_classes <= 0:
        raise ValueError("model.num_classes must be set (the task takes it from the data)")
    return CNN(num_classes=m.num_classes, dtype=jnp.dtype(m.dtype))
