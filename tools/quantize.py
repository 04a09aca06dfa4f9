"""Post-training quantization: a trained run -> a workdir whose checkpoint holds quantized weights.

    python tools/quantize.py --workdir=runs/sst2 --output=runs/sst2_int8 --weights=int8
    python tools/quantize.py --workdir=runs/sst2 --output=runs/sst2_w8a8 --weights=int8 --activations=int8
    python tools/quantize.py --workdir=runs/sst2 --output=runs/sst2_int4 --weights=int4 --group_size=128
    python -m jaxlm.evaluate --workdir=runs/sst2_int8      # or jaxlm.predict / jaxlm.generate

Every Dense kernel (and the token embeddings) becomes int8 codes with one float32 scale per output
channel, or int4/NF4 codes with a scale per `group_size` inputs; norms, biases and position tables
stay float. The output loads like any run and computes with the quantized weights (W8A8 also
quantizes each layer's input per row at run time; the scale is the row's own absmax, so there is
nothing to calibrate). A quantization-aware run (`model.quant.qat=True`) quantizes to exactly the
weights its forward pass used; its own `model.quant` settings are the defaults here. A LoRA run is
merged first; other PEFT methods are refused.
"""


from absl import app, flags
import jax

from jaxlm import config as config_lib
from jaxlm.compress import quantize
from jaxlm.peft import lora
from jaxlm.train import loop


def quantize_workdir(workdir: str, output: str, **settings) -> int:
    """Writes the quantized copy of `workdir`'s latest checkpoint to `output`; returns its step.
    `settings` (weights, activations, group_size, targets, embeddings) override the run's own
    `model.quant`; qat is always off in the output."""
    run, params, step = loop.restore_latest(workdir)
    method = run.task.peft.method
    if method not in ("full", "lora"):
        raise ValueError(f"{workdir} is a peft.method={method!r} run: quantize a full or LoRA run")
    params = jax.device_get(params)
    if method == "lora":
        params = lora.merge(params, run.task.peft)
    config = config_lib.load(workdir)
    config.peft.method = "full"
    config.init_from = ""
    config.model.quant.update({k: v for k, v in settings.items() if v is not None})
    config.model.quant.qat = False
    q = quantize.from_config(config.model)
    if not q.stored:
        raise ValueError("--weights: choose int8, int4 or nf4 (the run does not set model.quant.weights)")
    loop.export_workdir(config, workdir, output, lambda abstract: quantize.quantize_params(params, abstract, q),
                        step)
    return step


def main(argv):
    del argv
    args = flags.FLAGS
    step = quantize_workdir(args.workdir, args.output, weights=args.weights, activations=args.activations,
                            group_size=args.group_size, targets=args.targets)
    print(f"quantized step {step} of {args.workdir} into {args.output}")


if __name__ == "__main__":  # flags defined here only: tests import this module beside other tools
    flags.DEFINE_string("workdir", None, "a trained run (full fine-tuning, LoRA or QAT)")
    flags.DEFINE_string("output", None, "a new folder for the quantized run")
    flags.DEFINE_enum("weights", None, sorted(quantize.WEIGHT_TYPES), "default: the run's model.quant.weights")
    flags.DEFINE_enum("activations", None, ["none", "int8"], "default: the run's model.quant.activations")
    flags.DEFINE_integer("group_size", None, "4-bit weights: inputs per scale (default 128)")
    flags.DEFINE_string("targets", None, "regex of Dense layer paths to quantize (default: all)")
    flags.mark_flags_as_required(["workdir", "output"])
    app.run(main)
