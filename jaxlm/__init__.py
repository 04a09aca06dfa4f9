"""jaxlm: a JAX/Flax stack for developing large models from scratch and fine-tuning them."""

__version__ = "0.1.0"
