"""Objectives, kept apart from the trainer (see `base.Task` for what a task offers).

  task_class = tasks.get(config.task.name)
  tokenizer = task_class.build_tokenizer(config, workdir)
  task = task_class(config, tokenizer)   # fills config.model.vocab_size, builds task.model
"""

import importlib

# task name -> "module:class", imported on use so a text run never imports the image stack.
TASKS = {
    "causal_lm": "causal_lm:CausalLM",
    "sft": "sft:SFT",
    "classification": "classification:SequenceClassification",
    "token_classification": "classification:TokenClassification",
    "image_classification": "image_classification:ImageClassification",
    "mlm_nsp": "mlm_nsp:MlmNsp",
    "multitask": "multitask:MultiTask",
    "span_corruption": "seq2seq:SpanCorruption",
    "seq2seq": "seq2seq:Seq2Seq",
    "contrastive": "contrastive:Contrastive",
    "image_text": "image_text:ImageText",
    "captioning": "image_to_text:ImageToText",
    "vqa": "image_to_text:ImageToText",
    "distillation": "distillation:Distillation",
}


def get(name: str):
    """The task class registered under `name` (`config.task.name`)."""
    if name not in TASKS:
        raise ValueError(f"task.name={name!r}: expected one of {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(f"jaxlm.tasks.{module}"), cls)
