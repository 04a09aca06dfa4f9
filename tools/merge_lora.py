"""Folds a LoRA run's adapters into its base weights: a plain jaxlm workdir for serving.

    python tools/merge_lora.py --workdir=runs/sst2_lora --output=runs/sst2_merged
    python -m jaxlm.evaluate --workdir=runs/sst2_merged      # same predictions, no LoRA matmuls

The output holds `config.json` (peft.method='full', no init_from: the whole model is in its
checkpoint), the tokenizer and one checkpoint of the merged parameters at the run's step (with
fresh optimizer moments). It
loads like any run (`jaxlm.evaluate`, `jaxlm.predict`, `init_from`, `tools/convert_hf.py export`).
`jaxlm.peft.lora.unmerge` takes the adapters out again.
"""

import argparse
import os
import shutil

import jax

from jaxlm import config as config_lib
from jaxlm.peft import lora
from jaxlm.train import checkpoint, loop


def merge_workdir(workdir: str, output: str) -> int:
    if os.path.exists(output) and os.listdir(output):
        raise FileExistsError(f"{output} is not empty: merge into a new folder")
    run, params, step = loop.restore_latest(workdir)
    settings = run.task.peft
    if settings.method != "lora":
        raise ValueError(f"{workdir} is a peft.method={settings.method!r} run: only LoRA merges")
    merged = lora.merge(jax.device_get(params), settings)
    config = config_lib.load(workdir)
    config.peft.method = "full"
    config.init_from = ""
    shutil.copytree(os.path.join(workdir, "tokenizer"), os.path.join(output, "tokenizer"))
    plain = loop.setup(config, output)
    state = loop.base_params(plain)[0]
    params = jax.tree.map(lambda value, leaf: jax.device_put(value.astype(leaf.dtype), leaf.sharding),
                          merged, state.params)  # the plain model's tree: same names
    state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32), params=params)
    ckpt = checkpoint.Checkpointer(output, async_save=False)
    ckpt.save(step, state)
    ckpt.close()
    config_lib.save(config, output)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a LoRA run")
    parser.add_argument("--output", required=True, help="a new folder for the merged run")
    args = parser.parse_args()
    step = merge_workdir(args.workdir, args.output)
    print(f"merged step {step} of {args.workdir} into {args.output}")


if __name__ == "__main__":
    main()
