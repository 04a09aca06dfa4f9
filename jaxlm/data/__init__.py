"""Data: tokenizers, TFDS builders for local text (no TensorFlow) and Grain pipelines.

  from jaxlm.data import builders, pipeline, tokenizers
"""
