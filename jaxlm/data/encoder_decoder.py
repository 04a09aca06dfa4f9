"""The batch rows of encoder-decoder (T5-style) pipelines: span corruption and text pairs.

A batch is a dict of numpy arrays with b = global_batch_size // process_count rows:

  encoder_input_tokens   int32[b, Li]    the inputs, ending in EOS, then padding
  decoder_target_tokens  int32[b, Lt]    the targets, ending in EOS, then padding
  decoder_input_tokens   int32[b, Lt]    decoder_target_tokens shifted right by one, position 0
                                         `decoder_start_id` (default: pad_id, as in T5)
  decoder_loss_weights   float32[b, Lt]  1.0 on the real target tokens (EOS included), else 0.0
  example_weight         float32[b]      1.0 for a real example, 0.0 for an all-padding row

Padding positions hold `pad_id` (default 0, the jaxlm sentencepiece pad id).
"""

from __future__ import annotations

import dataclasses

import numpy as np

FEATURES = (
    "encoder_input_tokens",
    "decoder_target_tokens",
    "decoder_input_tokens",
    "decoder_loss_weights",
    "example_weight",
)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Pads (inputs, targets) into the features of one batch row."""

    inputs_length: int
    targets_length: int
    pad_id: int = 0
    decoder_start_id: int | None = None

    def _padded(self, ids: np.ndarray, length: int, what: str) -> np.ndarray:
        if len(ids) > length:
            raise ValueError(f"{what} has {len(ids)} tokens, more than its length {length}.")
        padded = np.full(length, self.pad_id, np.int32)
        padded[: len(ids)] = ids
        return padded

    def example(self, inputs: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
        decoder_target = self._padded(targets, self.targets_length, "A target")
        start = self.pad_id if self.decoder_start_id is None else self.decoder_start_id
        return {
            "encoder_input_tokens": self._padded(inputs, self.inputs_length, "An input"),
            "decoder_target_tokens": decoder_target,
            "decoder_input_tokens": np.concatenate([[start], decoder_target[:-1]]).astype(np.int32),
            "decoder_loss_weights": (np.arange(self.targets_length) < len(targets)).astype(
                np.float32
            ),
            "example_weight": np.float32(1.0),
        }

    def padding(self) -> dict[str, np.ndarray]:
        """An all-padding row: pad ids, zero loss weights and example_weight 0."""
        return {
            "encoder_input_tokens": np.full(self.inputs_length, self.pad_id, np.int32),
            "decoder_target_tokens": np.full(self.targets_length, self.pad_id, np.int32),
            "decoder_input_tokens": np.full(self.targets_length, self.pad_id, np.int32),
            "decoder_loss_weights": np.zeros(self.targets_length, np.float32),
            "example_weight": np.float32(0.0),
        }
