"""Model families on the shared core; `get(config.model)` builds the Linen module.

Each family module offers `from_config(config.model, pipeline)`; the task fills what comes from the data
(`vocab_size`, `num_classes`, `image_size`) before the model is built.
"""

import importlib

FAMILIES = ("gpt", "bert", "t5", "vit", "cnn")
POSITIONS = ("learned", "rotary", "sinusoidal")


def get(m, pipeline=None, **family_kwargs):
    """Builds the model named by `m.name`; `pipeline` (a `pipeline_parallel.Pipeline`) runs its
    layer stacks over the `stage` mesh axis; `family_kwargs` (e.g. BERT's task `heads`) go to the
    family's `from_config`. Fine-tuning methods and quantization attach to the built model from
    outside (`jaxlm.peft.attach`, `jaxlm.compress.quantize.attach`)."""
    if m.name not in FAMILIES:
        raise ValueError(f"model.name={m.name!r}: expected one of {list(FAMILIES)}")
    if m.positions not in POSITIONS:
        raise ValueError(f"model.positions={m.positions!r}: expected one of {list(POSITIONS)}")
    return importlib.import_module(f"jaxlm.models.{m.name}").from_config(m, pipeline, **family_kwargs)
