"""Compression: knowledge distillation, quantization and pruning on top of the same trainer."""
