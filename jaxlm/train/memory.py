"""Memory per device of a run, estimated before anything is allocated or compiled.

`estimate(run)` adds four terms for the mesh's first device:

- params and optimizer state: exact, the bytes of each leaf's shard (from the abstract state's
  shardings, so FSDP, tensor and stage splits all show);
- gradients: params-shaped in the param dtype, sharded like the params (twice that with gradient
  accumulation, which keeps a running sum beside each microbatch's gradients);
- activations of one train step: a model of what autodiff keeps for the backward pass of the
  Transformer families (GPT, BERT, T5, ViT; None for the CNN), per device.

The activation model, per layer and per token of the device's (micro)batch, with `c` the bytes of
`model.dtype`, heads and mlp split over `tensor`:

- `remat='none'` keeps every residual: per norm its float32 statistics plus the next matmul's
  input; q, k, v, the attention output (twice: for the softmax backward and the out projection),
  the attention probabilities [heads, keys] (in `c`, as `layers.attention` saves them); the MLP
  activation's own residuals (counted by tracing `jax.vjp` of it) and the down projection's
  input; and one copy per layer of the layer's weights (the scan slices them out of the stack);
- `remat='dots'` keeps the layer input and the matmul outputs (q, k, v, out, the MLP up/gate);
- `remat='full'` keeps only the layer input;
- on top of that one layer's backward working set: float32 attention scores and their gradient,
  the MLP hidden and its gradient, whatever the policy (the recomputed layer, for dots/full);
- the output head: float32 logits, their softmax and their gradient.

Pipeline parallelism (`mesh.stage` = S > 1): each stage runs num_layers / (S * R) layers on
microbatches of 1/M of the device's batch for R * M + S - 1 iterations and keeps the residuals of
every iteration, plus a buffer with the device's whole batch of activations [tokens, embed].

Not counted: dropout masks (`model.dropout` > 0), XLA's fusion and rematerialization choices,
and XLA:CPU's float32 copies of bfloat16 values (CPU has no native bfloat16 arithmetic).
"""

import dataclasses

import jax
import jax.numpy as jnp

from jaxlm.models import layers
from jaxlm.models import pipeline_parallel as pipeline
from jaxlm.train import metrics

MIB = 2 ** 20
F32 = 4


def estimate(run) -> dict:
    """Bytes per device of `run` (what `loop.setup` returns): params, optimizer, gradients,
    activations (None where the model family is not covered) and their total."""
    config = run.config
    device = run.partitioner.mesh.devices.flat[0]
    state = run.abstract_state
    trainable = metrics.bytes_on_device(state.params, device)
    accumulators = 2 if config.train.microbatches > 1 else 1
    figures = {"params": trainable + metrics.bytes_on_device(state.frozen, device),
               "optimizer": metrics.bytes_on_device(state.opt_state, device),
               "gradients": accumulators * trainable,  # only what trains has gradients
               "activations": activation_bytes(config, run.task, run.partitioner)}
    figures["total"] = sum(v for v in figures.values() if v is not None)
    return figures


def describe(figures: dict) -> str:
    """One line: 'memory per device (estimate): params 1.2 MiB, ..., total 9.9 MiB'."""
    mib = lambda b: "n/a" if b is None else f"{b / MIB:.1f} MiB"
    return "memory per device (estimate): " + ", ".join(f"{k} {mib(v)}" for k, v in figures.items())


@dataclasses.dataclass(frozen=True)
class Shape:
    """Per-device sizes of one layer stack: model dims split over `tensor`, and the tokens
    (`rows` sequences of `length`, attending to `keys` positions and, in a T5 decoder, to
    `cross_keys` encoder positions)."""

    emb: int
    head_dim: int
    heads: int
    kv_heads: int
    mlp: int
    c: int  # bytes of model.dtype
    gated: bool
    rows: int
    length: int
    keys: int
    cross_keys: int = 0

    @classmethod
    def of(cls, m, tensor: int, rows: int, length: int, cross_keys: int = 0) -> "Shape":
        return cls(emb=m.emb_dim, head_dim=m.head_dim or m.emb_dim // m.num_heads,
                   heads=m.num_heads // tensor, kv_heads=max((m.num_kv_heads or m.num_heads) // tensor, 1),
                   mlp=(m.mlp_dim or 4 * m.emb_dim) // tensor,
                   c=jnp.dtype(m.dtype).itemsize, gated=layers.ACTIVATIONS[m.mlp][1],
                   rows=rows, length=length, keys=length, cross_keys=cross_keys)

    @property
    def tokens(self) -> int:
        return self.rows * self.length

    @property
    def qkv(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        """One of the key and value projections' width (smaller with grouped-query attention)."""
        return self.kv_heads * self.head_dim


def activation_bytes(config, task, partitioner) -> int | None:
    """Activations of one train step on one device (see the module docstring)."""
    m, mesh = config.model, dict(partitioner.mesh.shape)
    rows = config.train.batch_size // config.train.microbatches // partitioner.batch_shards
    stacks, head = family_shapes(config, task, mesh["tensor"], rows)
    if stacks is None:
        return None
    pipe = pipeline.from_config(config)
    if pipe is not None:
        return pipeline_bytes(m, pipe, stacks) + head
    return (sum(num_layers * layer_bytes(m, s) for num_layers, s in stacks)
            + max(working_set(m, s) for _, s in stacks) + head)


def family_shapes(config, task, tensor: int, rows: int):
    """([(layers, Shape)] of the model's stacks, bytes of the output head), or (None, 0)."""
    m, length = config.model, config.data.seq_len
    vocab = m.vocab_size // tensor
    if m.name == "gpt":
        return [(m.num_layers, Shape.of(m, tensor, rows, length))], logits_bytes(rows * length, vocab)
    if m.name == "bert":
        return ([(m.num_layers, Shape.of(m, tensor, rows, length))],
                logits_bytes(rows * getattr(task, "max_predictions", 0), vocab))  # MLM head, if any
    if m.name == "vit":
        tokens = task.tokens_per_example
        return [(m.num_layers, Shape.of(m, tensor, rows, tokens))], logits_bytes(rows, m.num_classes)
    if m.name == "t5":
        target = task.target_len
        return ([(m.num_layers, Shape.of(m, tensor, rows, length)),
                 (m.num_decoder_layers or m.num_layers, Shape.of(m, tensor, rows, target, length))],
                logits_bytes(rows * target, vocab))
    return None, 0


def logits_bytes(tokens: int, vocab: int) -> int:
    """Float32 logits, their softmax and their gradient."""
    return 3 * tokens * vocab * F32


def layer_bytes(m, s: Shape) -> int:
    return saved_per_layer(m, s) + weights_per_layer(m, s)


def saved_per_layer(m, s: Shape) -> int:
    """Bytes one layer keeps for its backward pass under `model.remat`."""
    layer_input = s.tokens * s.emb * s.c
    if m.remat == "full":
        return layer_input
    cross = s.cross_keys > 0
    if m.remat == "dots":  # the projections' outputs: q, k, v, out; the MLP up (and gate)
        attention = s.tokens * (s.qkv + 2 * s.kv) + s.tokens * s.emb
        if cross:
            attention += 2 * s.tokens * s.qkv + 2 * s.rows * s.cross_keys * s.qkv + s.tokens * s.emb
        return layer_input + attention * s.c + (2 if s.gated else 1) * s.tokens * s.mlp * s.c
    norms = (3 if cross else 2) * s.tokens * (norm_residuals_per_token(m) + s.emb * s.c)
    attention = self_attention_residuals(m, s)
    if cross:  # q, out, out-projection input per target token; k, v per source token
        attention += ((3 * s.tokens + 2 * s.rows * s.cross_keys) * s.qkv
                      + s.rows * s.heads * s.length * s.cross_keys) * s.c
    mlp = s.tokens * (mlp_residuals_per_token(m, s) + s.mlp * s.c)
    return norms + attention + mlp


def self_attention_residuals(m, s: Shape) -> int:
    """q, k, v, the output twice and the probabilities (+ rotary's float32 sin and cos)."""
    saved = (5 * s.tokens * s.qkv + s.rows * s.heads * s.length * s.keys) * s.c
    if m.positions == "rotary":
        saved += s.tokens * s.head_dim * F32
    return saved


def weights_per_layer(m, s: Shape) -> int:
    """The copy of one layer's matmul weights (gathered over fsdp, in `model.dtype`) that a
    scanned stack without remat keeps for the backward pass."""
    if m.remat != "none" or not m.scan_layers:
        return 0
    attention = (2 * s.emb * (s.qkv + s.kv)) * (2 if s.cross_keys else 1)
    return (attention + (3 if s.gated else 2) * s.emb * s.mlp) * s.c


def working_set(m, s: Shape) -> int:
    """One layer's backward: float32 scores and their gradient, the MLP hidden and its gradient."""
    scores = 2 * s.rows * s.heads * s.length * max(s.keys, s.cross_keys) * F32
    return scores + 2 * s.tokens * s.mlp * s.c


def pipeline_bytes(m, pipe, stacks) -> int:
    """Pipelined stacks: on each stage device, the residuals of its num_layers / (S * R) layers
    for each of the schedule's iterations on a microbatch, plus the buffer of the device's whole
    batch [tokens, embed]."""
    total, working = 0, 0
    for num_layers, s in stacks:
        micro = dataclasses.replace(s, rows=s.rows // pipe.microbatches)
        layers_per_iteration = num_layers // (pipe.stages * pipe.repeats)
        total += pipe.iterations * layers_per_iteration * layer_bytes(m, micro) + s.tokens * s.emb * s.c
        working = max(working, working_set(m, micro))
    return total + working


def norm_residuals_per_token(m) -> int:
    """Bytes per token a norm (float32) keeps for its backward, as `jax.vjp` saves them."""
    module = layers.norm(layers.block_config(m))
    normalize = lambda x: module.apply(module.init(jax.random.key(0), x), x)
    return _residual_bytes_per_row(normalize, m.emb_dim, jnp.float32, 1)


def mlp_residuals_per_token(m, s: Shape) -> int:
    """Bytes per token the MLP's elementwise activation (times the gate, if gated) keeps."""
    activation, gated = layers.ACTIVATIONS[m.mlp]
    fn = (lambda gate, up: activation(gate) * up) if gated else activation
    return _residual_bytes_per_row(fn, s.mlp, jnp.dtype(m.dtype), 2 if gated else 1)


def _residual_bytes_per_row(fn, width: int, dtype, num_inputs: int) -> int:
    """What `jax.vjp(fn)` keeps per row of [rows, width] inputs: the residuals of two rows minus
    those of one (what does not grow with the rows, e.g. a norm's scale, cancels). Shapes only
    (`jax.eval_shape`): nothing runs, so the estimate costs no start-up time."""
    def residual_bytes(rows):
        inputs = [jax.ShapeDtypeStruct((rows, width), dtype)] * num_inputs
        residuals = jax.eval_shape(lambda *x: jax.vjp(fn, *x)[1], *inputs)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))
    return residual_bytes(2) - residual_bytes(1)
