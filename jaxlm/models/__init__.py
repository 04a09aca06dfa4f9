"""Model families on the shared core; `get(config.model)` builds the Linen module.

Each family module offers `from_config(config.model, pipeline)`; the task fills what comes from the data
(`vocab_size`, `num_classes`, `image_size`) before the model is built.
"""

import importlib

FAMILIES = ("gpt", "bert", "t5", "vit", "cnn")


def get(m, pipeline=None, peft=None, **family_kwargs):
    """Builds the model named by `m.name`; `pipeline` (a `parallel.pipeline.Pipeline`) runs its
    layer stacks over the `stage` mesh axis, `peft` (a `jaxlm.peft.Peft`) adds what
    parameter-efficient fine-tuning trains; `family_kwargs` (e.g. BERT's task `heads`) go to the
    family's `from_config`."""
    if m.name not in FAMILIES:
        raise ValueError(f"model.name={m.name!r}: expected one of {list(FAMILIES)}")
    if m.positions not in ("learned", "rotary"):
        raise ValueError(f"model.positions={m.positions!r}: expected 'learned' or 'rotary'")
    return importlib.import_module(f"jaxlm.models.{m.name}").from_config(m, pipeline, peft, **family_kwargs)
