"""Causal language modelling: predict token t+1 from tokens <= t.

A task owns what the trainer must not know about: the batch layout, how to run the model on it,
the loss and the metrics. Losses are returned as sums with their weight so that gradient
accumulation and multi-device reduction stay exact.
"""

import jax
import jax.numpy as jnp
import optax


def token_loss(logits, targets, weights=None):
    """Summed softmax cross-entropy (float32) and token accuracy over weighted positions."""
    if weights is None:
        weights = jnp.ones(targets.shape, jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    total = jnp.sum(losses * weights)
    return total, {"loss": total, "correct": jnp.sum(correct * weights), "weight": jnp.sum(weights)}


def summarize(sums: dict) -> dict:
    """Turns summed metrics into means: loss, perplexity, accuracy."""
    weight = jnp.maximum(sums["weight"], 1.0)
    loss = sums["loss"] / weight
    return {"loss": loss, "perplexity": jnp.exp(loss), "accuracy": sums["correct"] / weight}


class CausalLM:
    """Batches are `{'inputs': int32[b, l], 'targets': int32[b, l]}` (+ optional float `weights`)."""

    def __init__(self, model, seq_len: int):
        self.model = model
        self.seq_len = seq_len

    def init(self, rng: jax.Array, batch_size: int = 1):
        tokens = jnp.zeros((batch_size, self.seq_len), jnp.int32)
        return self.model.init({"params": rng, "dropout": rng}, tokens)

    def loss(self, params, batch, rng=None, train: bool = False):
        """Returns (summed loss, {'loss': sum, 'correct': sum, 'weight': sum})."""
        rngs = {"dropout": rng} if train and rng is not None else {}
        logits = self.model.apply({"params": params}, batch["inputs"], deterministic=not train,
                                  rngs=rngs)
        return token_loss(logits, batch["targets"], batch.get("weights"))

    summarize = staticmethod(summarize)
