r"""Translation time to quality: jaxlm against a PyTorch `torch.nn.Transformer`, same minutes.

    python tools/bench_translation.py --config=configs/t5_multi30k.py --minutes=10 \
        [--config.a.b=v ...] [--evals=4] [--eval_pairs=0] [--slice_s=60] [--threads=2]

Both sides learn English -> German on Multi30k in this one process, from the same start:
- the same sentencepiece pieces (the tokenizer jaxlm's run trains on the train split) and the
  same batches (two copies of the task's seeded `train_iterator`, each batch cut by the task's
  `fit_length` as the trainer does), teacher forcing, the loss averaged over target tokens
  (with the config's `task.label_smoothing`, the same formula on both sides);
- the same model size: jaxlm's model is the config's; PyTorch's is `torch.nn.Transformer`
  (pre-norm, the layers, width and heads of the config, GELU, the feed-forward width that gives
  the same parameter count per layer, a shared token embedding scaled by sqrt(width) plus
  sinusoidal positions, an untied output layer, Xavier initialisation, as in PyTorch's
  translation tutorial);
- the same optimizer: AdamW with the config's lr, betas, eps, weight decay on matrices, gradient
  clipping and the very same schedule function (`jaxlm.train.optim.schedule`);
- the same budget: `--minutes` of training each, in alternating slices of `--slice_s` seconds so
  that machine noise falls on both. Each side's schedule spans the steps it would run in that
  time at the step time of a calibration (`--calibration_steps` steps, thrown away); a side
  stops at the end of its schedule or of its minutes, whichever comes first. jaxlm's clock
  includes compiling its train call (once per batch length).

At `--evals` evenly spaced points of each side's minutes (and when it stops), BLEU (sacrebleu, detokenized text) of
beam-search translations (beam `task.beam_size`, GNMT length penalty 0.6, at most
`data.target_len` tokens) of the first `--eval_pairs` validation pairs (0: all 1,014) is
measured (outside the clock) and printed against the minutes trained. The last lines are the
final figures of each side and `bleu_difference` (jaxlm minus torch). Compare ratios from one run.
"""

import json
import logging
import math
import os
import shlex
import sys
import tempfile
import time
import warnings

import jax
import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags

# The checkout's jaxlm, also when it is not pip-installed (`python tools/bench_translation.py`).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxlm.train import loop, optim  # noqa: E402
from jaxlm.train import state as state_lib  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs/t5_multi30k.py"),
                                "The jaxlm seq2seq config (model, data, optimizer of both sides).",
                                lock_config=True)
flags.DEFINE_float("minutes", 10.0, "Training minutes per side.")
flags.DEFINE_integer("evals", 4, "BLEU measurements per side, evenly spaced over its steps.")
flags.DEFINE_integer("eval_pairs", 0, "Validation pairs translated for BLEU (0: all).")
flags.DEFINE_float("slice_s", 60.0, "Seconds one side trains before the other takes over.")
flags.DEFINE_integer("calibration_steps", 50, "Steps per side timed to size the schedules.")
flags.DEFINE_integer("threads", 2, "torch.set_num_threads")
flags.DEFINE_string("json", None, "Also write every figure here.")


class TorchTranslator(torch.nn.Module):
    """The reference: `torch.nn.Transformer` as PyTorch's translation tutorial builds it."""

    def __init__(self, vocab_size: int, m, max_len: int):
        super().__init__()
        width, layers = m.emb_dim, m.num_layers
        # jaxlm's T5 block: attention 4 w^2 + gated MLP 3 w f; torch's: 4 w^2 + 2 w ff.
        gated = m.mlp in ("geglu", "swiglu")
        ff = (3 if gated else 2) * (m.mlp_dim or 4 * width) // 2
        self.width = width
        self.embed = torch.nn.Embedding(vocab_size, width)
        self.transformer = torch.nn.Transformer(
            width, m.num_heads, layers, m.num_decoder_layers or layers, ff, m.dropout,
            activation="gelu", batch_first=True, norm_first=True)
        self.out = torch.nn.Linear(width, vocab_size, bias=False)
        self.dropout = torch.nn.Dropout(m.dropout)
        position = torch.arange(max_len)[:, None]
        rates = torch.exp(-math.log(10000.0) * torch.arange(0, width, 2) / width)
        table = torch.zeros(max_len, width)
        table[:, 0::2], table[:, 1::2] = torch.sin(position * rates), torch.cos(position * rates)
        self.register_buffer("positions", table)
        for p in self.parameters():
            if p.dim() > 1:
                torch.nn.init.xavier_uniform_(p)

    def _embed(self, tokens):
        x = self.embed(tokens) * math.sqrt(self.width) + self.positions[: tokens.shape[1]]
        return self.dropout(x)

    def encode(self, source):
        pad = source == 0
        return self.transformer.encoder(self._embed(source), src_key_padding_mask=pad), pad

    def decode(self, memory, source_pad, target_in):
        length = target_in.shape[1]
        causal = torch.nn.Transformer.generate_square_subsequent_mask(length, dtype=memory.dtype)
        x = self.transformer.decoder(self._embed(target_in), memory, tgt_mask=causal, tgt_is_causal=True,
                                     memory_key_padding_mask=source_pad)
        return self.out(x)

    def forward(self, source, target_in):
        memory, pad = self.encode(source)
        return self.decode(memory, pad, target_in)


@torch.no_grad()
def torch_beam_search(model, source, *, beam: int, max_len: int, eos: int, alpha: float = 0.6):
    """Beam search with jaxlm's ranking: final log-probability / ((5 + length) / 6) ** alpha,
    the length counting the EOS; start token 0; no cache (targets are short)."""
    batch = source.shape[0]
    memory, pad = model.encode(source)
    memory, pad = memory.repeat_interleave(beam, 0), pad.repeat_interleave(beam, 0)
    seqs = torch.zeros(batch * beam, 1, dtype=torch.long)
    scores = torch.full((batch, beam), -math.inf)
    scores[:, 0] = 0.0
    best = torch.full((batch,), -math.inf)
    best_seq = torch.zeros(batch, max_len, dtype=torch.long)
    for t in range(max_len):
        logp = model.decode(memory, pad, seqs)[:, -1].float().log_softmax(-1)
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(batch, beam * vocab)
        top, idx = cand.topk(2 * beam, dim=-1)
        origin, token = idx // vocab, idx % vocab
        prev = seqs.reshape(batch, beam, -1)
        grown = torch.cat([torch.gather(prev, 1, origin[..., None].expand(-1, -1, prev.shape[-1])),
                           token[..., None]], -1)  # [batch, 2 beam, t + 2]
        ends = (token == eos) | (t == max_len - 1)
        normalized = torch.where(ends, top / ((5 + t + 1) / 6) ** alpha, -math.inf)
        best_now, which = normalized.max(-1)
        better = best_now > best
        best = torch.where(better, best_now, best)
        chosen = grown[torch.arange(batch), which, 1:]
        best_seq[better, : t + 1] = chosen[better]
        best_seq[better, t + 1:] = 0
        alive_scores = torch.where(token == eos, -math.inf, top)
        scores, keep = alive_scores.topk(beam, dim=-1)
        seqs = torch.gather(grown, 1, keep[..., None].expand(-1, -1, grown.shape[-1])).reshape(batch * beam, -1)
        # Stop once no live beam can beat the best finished one (log-probs only fall).
        if bool((scores.max(-1).values / ((5 + max_len) / 6) ** alpha <= best).all()):
            break
    return best_seq


class JaxSide:
    """The trainer's own pieces: `loop.setup`, `state.init`, `loop.make_train_call`."""

    name = "jaxlm"

    def __init__(self, config, workdir: str):
        self.config, self.workdir = config, workdir

    def start(self, steps: int):
        self.config.train.steps = steps
        self.run = loop.setup(self.config, self.workdir)
        self.state = state_lib.init(self.run.partitioner, self.run.task, self.run.tx,
                                    jax.random.key(self.config.seed), self.run.shardings)
        self.call = loop.make_train_call(self.run)
        self.compiled = {}
        self.iterator = self.run.task.train_iterator()
        self.step, self.steps, self.losses = 0, steps, []

    def compile_lengths(self) -> float:
        """Compiles the call for every batch length `fit_length` can give (multiples of
        `data.pad_multiple`), as a run meets them; returns the seconds it took."""
        start = time.perf_counter()
        full = self._stacked(self.config.train.steps_per_call)
        d = self.config.data
        multiple = d.pad_multiple if d.pad_multiple > 0 else max(d.seq_len, self.run.task.target_len)
        for length in range(multiple, max(d.seq_len, self.run.task.target_len) + multiple, multiple):
            self._compiled({k: v[..., :length] if v.ndim == 3 else v for k, v in full.items()})
        return time.perf_counter() - start

    def _stacked(self, k: int) -> dict:
        batches = [next(self.iterator) for _ in range(k)]
        return {key: np.stack([b[key] for b in batches]) for key in batches[0]}

    def _compiled(self, stacked: dict):
        shapes = tuple((k, v.shape) for k, v in sorted(stacked.items()))
        if shapes not in self.compiled:
            sharded = self.run.partitioner.shard_batch(stacked, loop.STACKED)
            self.compiled[shapes] = self.call.lower(self.state, sharded).compile()
        return self.compiled[shapes]

    def train(self, max_steps: int) -> int:
        """One call of `train.steps_per_call` steps (the last ones may run fewer)."""
        k = min(self.config.train.steps_per_call, max_steps)
        stacked = self.run.task.fit_length(self._stacked(k))
        self.state, metrics = jax.block_until_ready(
            self._compiled(stacked)(self.state, self.run.partitioner.shard_batch(stacked, loop.STACKED)))
        self.losses.extend(np.asarray(metrics["loss"]).tolist())
        self.step += k
        return k

    def bleu(self, split: str, max_batches: int) -> float:
        return self.run.task.predictions(self.state.model_params, split, max_batches=max_batches)[0]["bleu"]


class TorchSide:
    """The reference model on the same batches, optimizer and schedule function."""

    name = "torch"

    def __init__(self, config, task):
        self.config, self.task = config, task

    def start(self, steps: int):
        c = self.config
        torch.manual_seed(c.seed)
        self.model = TorchTranslator(self.task.config.model.vocab_size, c.model,
                                     max(c.data.seq_len, self.task.target_len))
        params = list(self.model.parameters())
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c.optim.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=c.optim.lr, betas=(c.optim.b1, c.optim.b2), eps=c.optim.eps)
        self.schedule = optim.schedule(c.optim, steps)
        self.iterator = self.task.train_iterator()
        self.step, self.steps, self.losses = 0, steps, []

    def train(self, max_steps: int) -> int:
        b = {k: torch.as_tensor(np.asarray(v)) for k, v in self.task.fit_length(next(self.iterator)).items()}
        for group in self.opt.param_groups:
            group["lr"] = float(self.schedule(self.step))
        self.model.train()
        logits = self.model(b["encoder_input_tokens"].long(), b["decoder_input_tokens"].long())
        losses = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["decoder_target_tokens"].long().flatten(),
                                                   reduction="none",
                                                   label_smoothing=self.config.task.label_smoothing)
        weights = b["decoder_loss_weights"].flatten().float()
        loss = (losses * weights).sum() / weights.sum().clamp(min=1.0)
        loss.backward()
        if self.config.optim.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.optim.clip_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss.item())
        self.step += 1
        return 1

    def bleu(self, split: str, max_batches: int) -> float:
        import sacrebleu  # pylint: disable=import-outside-toplevel

        task = self.task
        pairs = task.split_pairs(split)
        hypotheses = []
        self.model.eval()
        for batch in task.eval_batches(split, max_batches):
            source = torch.as_tensor(np.asarray(batch["encoder_input_tokens"])[batch["example_weight"] > 0]).long()
            tokens = torch_beam_search(self.model, source, beam=task.config.task.beam_size,
                                       max_len=task.target_len, eos=task.eos_id).numpy()
            for row in tokens:
                end = np.argmax(row == task.eos_id) if (row == task.eos_id).any() else len(row)
                hypotheses.append(task.tokenizer.decode(row[:end].tolist()))
        references = [pairs[i][1] for i in range(len(hypotheses))]
        return sacrebleu.corpus_bleu(hypotheses, [references]).score


def calibrate(side, steps: int) -> float:
    """Seconds per step after a first untimed call (jaxlm: compiled for every length first)."""
    side.start(steps)
    if side.name == "jaxlm":
        side.compile_lengths()
    side.train(steps)
    start, done = time.perf_counter(), 0
    while done < steps:
        done += side.train(steps - done)
    return (time.perf_counter() - start) / done


def parameter_count(side) -> int:
    if side.name == "torch":
        return sum(p.numel() for p in side.model.parameters())
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(side.state.model_params))


def main(_):
    warnings.filterwarnings("ignore", message="enable_nested_tensor is True")  # pre-norm layers
    config = FLAGS.config
    if config.task.name != "seq2seq":
        raise ValueError(f"--config must be a seq2seq task (task.name={config.task.name!r})")
    if FLAGS.minutes <= 0 or FLAGS.evals < 1 or FLAGS.slice_s <= 0 or FLAGS.calibration_steps < 1:
        raise ValueError("need --minutes > 0, --evals >= 1, --slice_s > 0 and --calibration_steps >= 1")
    logging.getLogger("absl").setLevel(logging.WARNING)
    torch.set_num_threads(FLAGS.threads)
    command = "python " + shlex.join(sys.argv)
    wall = time.perf_counter()
    split = config.data.eval_split
    with tempfile.TemporaryDirectory() as workdir:
        jx = JaxSide(config, workdir)
        jx.start(FLAGS.calibration_steps)  # trains the tokenizer, builds the task torch shares
        tx = TorchSide(config, jx.run.task)
        sides = (jx, tx)
        step_s = {s.name: calibrate(s, FLAGS.calibration_steps) for s in sides}
        budget = FLAGS.minutes * 60
        for s in sides:
            s.start(max(int(budget / step_s[s.name]), 1))
        compile_s = jx.compile_lengths()  # counted: a run compiles every length it meets
        batch = config.train.batch_size
        max_batches = -(-FLAGS.eval_pairs // batch) if FLAGS.eval_pairs else 0
        clock = {"jaxlm": compile_s, "torch": 0.0}
        curves = {s.name: [] for s in sides}
        marks = {s.name: [budget * (i + 1) / FLAGS.evals for i in range(FLAGS.evals)] for s in sides}
        training = lambda s: s.step < s.steps and clock[s.name] < budget

        def record(s):
            curves[s.name].append({"step": s.step, "minutes": clock[s.name] / 60,
                                   "train_loss": float(np.mean(s.losses[-20:])) if s.losses else float("nan"),
                                   "bleu": s.bleu(split, max_batches)})
            print(f"{s.name}: {curves[s.name][-1]}", flush=True)
        while any(training(s) for s in sides):
            for s in sides:
                slice_start = time.perf_counter()
                while training(s) and time.perf_counter() - slice_start < FLAGS.slice_s:
                    start = time.perf_counter()
                    s.train(s.steps - s.step)
                    clock[s.name] += time.perf_counter() - start
                    if clock[s.name] >= marks[s.name][0] or not training(s):
                        while marks[s.name] and clock[s.name] >= marks[s.name][0]:
                            marks[s.name].pop(0)
                        record(s)
        for s in sides:
            if not curves[s.name]:  # its compiling alone took the minutes
                record(s)
        params = {s.name: parameter_count(s) for s in sides}

    pairs = FLAGS.eval_pairs or len(jx.run.task.split_pairs(split))
    print(f"\njax {jax.__version__} {jax.devices()[0].device_kind}; torch {torch.__version__} threads "
          f"{torch.get_num_threads()}")
    print(f"parameters: jaxlm {params['jaxlm']:,}, torch {params['torch']:,}; batch {batch}; "
          f"calibrated s/step: jaxlm {step_s['jaxlm']:.3f}, torch {step_s['torch']:.3f}; jaxlm compile "
          f"{compile_s:.0f} s (counted); "
          f"BLEU on {pairs} {split} pairs, beam {config.task.beam_size}\n")
    print("| side | step | minutes | train loss | BLEU |")
    print("|---|---|---|---|---|")
    for name, points in curves.items():
        for p in points:
            print(f"| {name} | {p['step']} | {p['minutes']:.1f} | {p['train_loss']:.3f} | {p['bleu']:.2f} |")
    final = {name: points[-1] for name, points in curves.items()}
    print(f"\ncommand: {command}")
    print(f"wall_s={time.perf_counter() - wall:.0f} jaxlm_bleu={final['jaxlm']['bleu']:.2f} "
          f"torch_bleu={final['torch']['bleu']:.2f} jaxlm_steps={final['jaxlm']['step']} "
          f"torch_steps={final['torch']['step']} bleu_difference={final['jaxlm']['bleu'] - final['torch']['bleu']:.2f}")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump({"command": command, "curves": curves, "params": params, "step_s": step_s}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
