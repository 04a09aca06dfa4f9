"""Pipeline, tensor and sequence parallelism on 8 host devices give the single-device numbers."""

import collections
import functools
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxlm.models import pipeline_parallel as pipeline
from jaxlm.parallel.partitioner import make_mesh
from jaxlm.train import loop, state as state_lib, step as step_lib
from test_train import needs_shakespeare, read_metrics, tiny_config


def toy_layer(params, h, ctx, rng):
    """A layer whose output depends on the row's position and on the dropout key, so that a
    microbatch meeting the wrong layer, context row or key changes the result."""
    w, b = params
    h = jnp.tanh(h @ w + b) + 0.01 * ctx["positions"].reshape(-1, 1)
    if rng is not None:
        h = h + 0.01 * jax.random.normal(rng, h.shape)
    return h


def sequential(params, x, ctx, rng, microbatches):
    """Microbatch by microbatch (rows b % M == m), layer after layer, with the keys the pipeline
    folds in (layer, then microbatch)."""
    batch = ctx["positions"].shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])
    out = jnp.zeros_like(rows)
    for m in range(microbatches):
        h = rows[m::microbatches].reshape(-1, x.shape[-1])
        micro_ctx = {"positions": ctx["positions"][m::microbatches]}
        for layer in range(params[0].shape[0]):
            key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, layer), m)
            h = toy_layer((params[0][layer], params[1][layer]), h, micro_ctx, key)
        out = out.at[m::microbatches].set(h.reshape(-1, *rows.shape[1:]))
    return out.reshape(x.shape)


PIPES = [pipeline.Pipeline(2, 2), pipeline.Pipeline(2, 4), pipeline.Pipeline(4, 8),
         pipeline.Pipeline(4, 1), pipeline.Pipeline(2, 2, "circular", 2),
         pipeline.Pipeline(2, 4, "circular", 4), pipeline.Pipeline(4, 4, "circular", 2)]


@pytest.mark.parametrize("pipe", PIPES, ids=str)
@pytest.mark.parametrize("dropout", [False, True])
def test_the_pipeline_equals_the_layers_applied_in_order(pipe, dropout):
    num_layers, batch, length, width = 8, 8, 3, 16
    keys = jax.random.split(jax.random.key(0), 3)
    params = (jax.random.normal(keys[0], (num_layers, width, width)) / 4,
              jax.random.normal(keys[1], (num_layers, width)))
    x = jax.random.normal(keys[2], (batch * length, width))
    ctx = {"positions": jnp.arange(batch * length).reshape(batch, length) % 5,
           "shared": jnp.ones((1, 2))}
    rng = jax.random.key(7) if dropout else None
    mesh = make_mesh(ml_collections.ConfigDict(
        dict(data=8 // pipe.stages, fsdp=1, tensor=1, stage=pipe.stages, num_devices=0)))

    def loss(params, fn):
        return jnp.sum(fn(params) ** 2)

    piped = functools.partial(pipeline.run, pipe, toy_layer, x=x, ctx=ctx, rng=rng)
    with jax.set_mesh(mesh):
        got, got_grads = jax.jit(jax.value_and_grad(lambda p: loss(p, lambda q: piped(params=q))))(params)
        hlo = jax.jit(lambda p: piped(params=p)).lower(params).compile().as_text()
    want, want_grads = jax.value_and_grad(
        lambda p: loss(p, lambda q: sequential(q, x, ctx, rng, pipe.microbatches)))(params)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max())
    assert "collective-permute" in hlo  # activations really move between stage devices


@pytest.mark.parametrize("pipe", PIPES, ids=str)
def test_the_schedule_is_busy_exactly_outside_the_bubble_formula(pipe):
    S, M, R = pipe.stages, pipe.microbatches, pipe.repeats
    assert pipe.bubble == pytest.approx((S - 1) / (R * M + S - 1))
    assert pipeline.schedule_utilization(pipe) == pytest.approx(1 - pipe.bubble)


@pytest.mark.parametrize("pipe", [pipeline.Pipeline(4, 8), pipeline.Pipeline(2, 4, "circular", 3)])
def test_every_microbatch_passes_every_stage_in_order_once_per_repeat(pipe):
    """The schedule's table: stage s works on item t - s, so microbatch m of repeat r reaches
    stage s + 1 one iteration after stage s, and no stage holds two items at once."""
    micro, repeat = pipeline.schedule(pipe)
    assert micro.shape == repeat.shape == (pipe.iterations, pipe.stages)
    for r in range(pipe.repeats):
        for m in range(pipe.microbatches):
            t, s = np.nonzero((micro == m) & (repeat == r))
            assert list(s) == list(range(pipe.stages)) and list(np.diff(t)) == [1] * (pipe.stages - 1)
    assert np.all((micro >= 0) == (repeat >= 0))


def test_the_circular_schedule_has_the_smaller_bubble():
    assert pipeline.Pipeline(4, 8, "circular", 2).bubble < pipeline.Pipeline(4, 8).bubble


@pytest.mark.parametrize("kwargs, message", [
    (dict(stages=2, microbatches=2, schedule="zigzag"), "pipeline.schedule"),
    (dict(stages=2, microbatches=2, repeats=2), "circular"),
    (dict(stages=4, microbatches=2, schedule="circular", repeats=2), "microbatches >= mesh.stage"),
])
def test_bad_pipeline_settings_are_errors_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline.Pipeline(**kwargs)


def test_layers_or_batch_that_do_not_split_are_errors():
    with pytest.raises(ValueError, match="do not split into mesh.stage=4"):
        pipeline.Pipeline(4, 4).check(num_layers=6, batch=8)
    with pytest.raises(ValueError, match="pipeline.microbatches=3"):
        pipeline.Pipeline(2, 3).check(num_layers=4, batch=8)


MESHES = {
    "stage2_data4": dict(mesh=dict(stage=2, data=4)),
    "stage4_micro8": dict(mesh=dict(stage=4, data=2), pipeline=dict(microbatches=8)),
    "stage2_fsdp2_tensor2": dict(mesh=dict(stage=2, fsdp=2, tensor=2, data=1)),
    "circular_repeats2": dict(mesh=dict(stage=2, data=4),
                              pipeline=dict(schedule="circular", repeats=2, microbatches=4)),
    "stage2_tensor2_seqpar_remat": dict(mesh=dict(stage=2, data=2, tensor=2, sequence_parallel=True),
                                        model=dict(remat="full")),
    "tensor2_seqpar": dict(mesh=dict(data=4, tensor=2, sequence_parallel=True)),
}


def config_for(data_dir, layout=None):
    c = tiny_config(data_dir, steps=10, batch_size=16, steps_per_call=5)
    c.model.update(dict(num_layers=4, scan_layers=True))
    if layout is not None:
        c.mesh.update({"num_devices": 0, "data": 1, **layout["mesh"]})
        c.pipeline.update(layout.get("pipeline", {}))
        c.model.update(layout.get("model", {}))
    return c


def first_gradients(config, tmp_path):
    """The gradients of the first train batch, computed on the config's mesh."""
    run = loop.setup(config, str(tmp_path))
    state = state_lib.init(run.partitioner, run.task, run.tx, jax.random.key(config.seed), run.shardings)
    batch = run.partitioner.shard_batch(next(run.task.train_iterator()))
    grads_fn = run.partitioner.jit(lambda p, b: step_lib.grads_and_sums(run.task, p, b, None, 1)[0],
                                   in_shardings=(run.shardings.params, run.partitioner.sharding(("batch",))))
    return jax.device_get(grads_fn(state.params, batch))


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    loop.train_and_evaluate(config_for(data_dir), str(workdir))
    return workdir, first_gradients(config_for(data_dir), workdir)


@needs_shakespeare
@pytest.mark.parametrize("name", sorted(MESHES))
def test_a_parallel_layout_gives_the_single_device_losses_and_gradients(name, reference, data_dir, tmp_path):
    ref_dir, ref_grads = reference
    config = config_for(data_dir, MESHES[name])
    loop.train_and_evaluate(config, str(tmp_path))
    for key in ("train/loss", "train/grad_norm"):
        want, got = read_metrics(ref_dir, key), read_metrics(tmp_path, key)
        np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)],
                                   rtol=1e-5, err_msg=key)
    grads = first_gradients(config_for(data_dir, MESHES[name]), tmp_path / "grads")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(),
                                   err_msg=jax.tree_util.keystr(path))


def test_tensor_parallelism_all_reduces_once_per_branch_and_sequence_parallelism_gathers_tokens(data_dir, tmp_path):
    """Megatron: one all-reduce after attention and one after the MLP in a layer's forward. With
    sequence parallelism the residual stream is split over `tensor` too, so each branch first
    gathers its tokens (XLA:CPU keeps all-reduce + slice where GPU/TPU form a reduce-scatter)."""
    counts = {}
    for sp in (False, True):
        config = config_for(data_dir, dict(mesh=dict(data=4, tensor=2, sequence_parallel=sp)))
        config.model.scan_layers = False
        run = loop.setup(config, str(tmp_path))
        partitioner = run.partitioner
        forward = partitioner.jit(lambda p, b: run.task.loss(p, b, train=False)[0],
                                  in_shardings=(run.shardings.params, partitioner.sharding(("batch",))))
        batch = partitioner.shard_batch(next(run.task.train_iterator()))
        hlo = forward.lower(run.abstract_state.params, batch).compile().as_text()
        counts[sp] = collections.Counter(re.findall(r"= \S+ (all-reduce|all-gather|reduce-scatter)\(", hlo))
    layers = config.model.num_layers
    outside_layers = counts[False]["all-reduce"] - 2 * layers  # the vocab-sharded embedding and loss
    assert 0 <= outside_layers <= 4 and counts[False]["all-gather"] == 0, counts
    assert counts[True]["all-gather"] >= 2 * layers, counts
    assert counts[True]["all-reduce"] + counts[True]["reduce-scatter"] == counts[False]["all-reduce"], counts


@needs_shakespeare
def test_bf16_compute_through_the_pipeline_keeps_f32_master_weights(reference, data_dir, tmp_path):
    """Mixed precision: bfloat16 matmuls, float32 parameters, optimizer state and loss; the
    losses track the float32 run."""
    ref_dir, _ = reference
    config = config_for(data_dir, dict(mesh=dict(stage=2, data=4), model=dict(dtype="bfloat16")))
    state = loop.train_and_evaluate(config, str(tmp_path))
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state))} == {np.dtype("float32"), np.dtype("int32")}
    want, got = read_metrics(ref_dir), read_metrics(tmp_path)
    np.testing.assert_allclose([got[s] for s in range(1, 11)], [want[s] for s in range(1, 11)], rtol=2e-2)
    assert got != want  # the compute really ran in bfloat16


def test_fsdp_gathers_each_layers_weights_inside_the_scan(data_dir, tmp_path):
    """With fsdp=8 no device ever holds the whole stack: the loop bodies gather one layer's
    weights at a time (forward and backward), the top level gathers no stacked weight."""
    config = config_for(data_dir, dict(mesh=dict(fsdp=8)))
    run = loop.setup(config, str(tmp_path))
    batch = {k: v[None] for k, v in next(run.task.train_iterator()).items()}
    hlo = loop.make_train_call(run).lower(
        run.abstract_state, run.partitioner.shard_batch(batch, loop.STACKED)).compile().as_text()
    gathered = {comp.split(" ", 1)[0]: re.findall(r"= f32\[([\d,]*)\]\S* all-gather(?:-start)?\(", comp)
                for comp in hlo.split("\n\n")}
    entry = next(shapes for name, shapes in gathered.items() if name.startswith("ENTRY"))
    in_loops = [s for name, shapes in gathered.items() if not name.startswith("ENTRY") for s in shapes]
    layers = config.model.num_layers
    assert not [s for s in entry if s.startswith(f"{layers},")], entry
    kernels = ["32,4,8", "4,8,32", "32,128", "128,32"]  # query/key/value, out, wi, wo of one layer
    assert all(in_loops.count(k) >= (3 if k == "32,4,8" else 1) * 2 for k in kernels), in_loops
