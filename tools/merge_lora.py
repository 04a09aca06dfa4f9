"""Folds a LoRA run's adapters into its base weights: a plain jaxlm workdir for serving.
A QLoRA run's 4-bit base is dequantized first, so its merged run is a float model.

    python tools/merge_lora.py --workdir=runs/sst2_lora --output=runs/sst2_merged
    python -m jaxlm.evaluate --workdir=runs/sst2_merged      # same predictions, no LoRA matmuls

The output (`jaxlm.train.loop.export_workdir`) holds `config.json` (peft.method='full', no
init_from: the whole model is in its checkpoint), the tokenizer and one checkpoint of the merged
parameters at the run's step. It loads like any run (`jaxlm.evaluate`, `jaxlm.predict`,
`init_from`, `tools/convert_hf.py export`). `jaxlm.peft.lora.unmerge` takes the adapters out again.
"""


from absl import app, flags
import jax

from jaxlm import config as config_lib
from jaxlm.compress import quantize
from jaxlm.peft import lora
from jaxlm.train import loop


def merge_workdir(workdir: str, output: str) -> int:
    run, params, step = loop.restore_latest(workdir)
    settings = run.task.peft
    if settings.method != "lora":
        raise ValueError(f"{workdir} is a peft.method={settings.method!r} run: only LoRA merges")
    params, config = jax.device_get(params), config_lib.load(workdir)
    q = quantize.from_config(config.model)
    if q.stored:  # QLoRA: the 4-bit base becomes floats, the adapters go into them
        params, config.model = quantize.dequantize_params(params, q), quantize.float_model(config.model)
    merged = lora.merge(params, settings)
    config.peft.method = "full"
    config.init_from = ""
    loop.export_workdir(config, workdir, output, lambda _: merged, step)
    return step


def main(argv):
    del argv
    args = flags.FLAGS
    step = merge_workdir(args.workdir, args.output)
    print(f"merged step {step} of {args.workdir} into {args.output}")


if __name__ == "__main__":  # flags defined here only: tests import this module beside other tools
    flags.DEFINE_string("workdir", None, "a LoRA run")
    flags.DEFINE_string("output", None, "a new folder for the merged run")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
