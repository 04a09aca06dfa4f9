"""The trainer, top to bottom: setup, state, data, loop, eval, save.

`train_and_evaluate(config, workdir)` is what `python -m jaxlm.main` runs and what a notebook
calls. One jitted function runs `train.steps_per_call` steps over a stack of batches; figures are
fetched from the device only when they are logged, so the host never waits on a step it does not
need to see.
"""

import contextlib
import functools
import glob
import json
import logging
import os
import re
import shutil
import signal
import sys
import time

import flax
import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import convert, peft, tasks, tree
from jaxlm.compress import prune, quantize
from jaxlm.models import pipeline_parallel
from jaxlm.parallel.partitioner import Partitioner
from jaxlm.train import checkpoint, compile_cache, memory, metrics as metrics_lib, optim, state as state_lib, step as step_lib
from jaxlm.train import workdir as workdir_lib

log = logging.getLogger("jaxlm")
STACKED = (None, "batch")  # logical axes of a stack of batches [steps, batch, ...]


class NonFiniteLoss(RuntimeError):
    pass


def setup(config, workdir: str):
    """Everything a run or a tool needs before training: tokenizer, task (with its model),
    optimizer, partitioner and the state's shardings. Fills `config.model.vocab_size`, and
    `optim.lr` when it is auto (-1)."""
    compile_cache.use(config.train.compilation_cache)
    peft.resolve_learning_rate(config)
    hf_dir = hf_source(config.init_from)
    if hf_dir:  # the architecture comes from the Hugging Face config
        config.model.update(convert.model_overrides(hf_dir))
    elif config.init_from:  # ... or from the jaxlm run's
        config.model.update(source_architecture(config.init_from))
    task_class = tasks.get(config.task.name)
    tokenizer = task_class.build_tokenizer(config, workdir)
    task = task_class(config, tokenizer)
    tx, lr_schedule = optim.make(config.optim, config.train.steps)
    partitioner = Partitioner.from_config(config)
    check_batch(config, partitioner)
    tx = prune.optimizer(tx, config, task, partitioner)  # masks in the optimizer state
    shardings = state_lib.shardings(partitioner, task, tx)
    return Run(config, tokenizer, task, tx, lr_schedule, partitioner, shardings, hf_dir)


# config.model keys that say how a run computes or trains, not what its parameters are
RUN_MODEL_KEYS = ("dropout", "dtype", "param_dtype", "remat", "scan_layers", "quant", "init_std",
                  "num_classes")


def source_architecture(workdir: str) -> dict:
    """The `config.model` shape of the jaxlm run in `workdir` (its head's classes excepted)."""
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        raise FileNotFoundError(f"init_from={workdir!r} is neither a jaxlm workdir (no config.json), "
                                "a Hugging Face folder nor an installed package shipping one")
    model = config_lib.load(workdir).model.to_dict()
    return {k: v for k, v in model.items() if k not in RUN_MODEL_KEYS}


def hf_source(init_from: str) -> str | None:
    """The Hugging Face model folder `init_from` names (a folder or an installed package), else
    None (a jaxlm workdir, or nothing)."""
    if not init_from:
        return None
    return convert.resolve(init_from)


def check_batch(config, partitioner) -> None:
    t = config.train
    if t.batch_size % t.microbatches:
        raise ValueError(f"train.batch_size={t.batch_size} does not split into train.microbatches={t.microbatches}")
    shards = partitioner.batch_shards
    for name, size in (("train.batch_size", t.batch_size), ("train.batch_size / train.microbatches",
                                                            t.batch_size // max(t.microbatches, 1))):
        if size % shards or size % jax.process_count():
            raise ValueError(f"{name}={size} must divide over the {shards} batch shards of the mesh "
                             f"{dict(partitioner.mesh.shape)} and {jax.process_count()} processes")
    pipe = pipeline_parallel.from_config(config)
    if pipe and (t.batch_size // t.microbatches) % pipe.microbatches:
        raise ValueError(f"train.batch_size / train.microbatches = {t.batch_size // t.microbatches} "
                         f"does not split into pipeline.microbatches={pipe.microbatches}")


class Run:
    """The pieces `setup` builds, kept together (`hf_dir`: the Hugging Face folder `init_from`
    names, or None)."""

    def __init__(self, config, tokenizer, task, tx, lr_schedule, partitioner, shardings, hf_dir):
        self.config, self.tokenizer, self.task = config, tokenizer, task
        self.tx, self.lr_schedule = tx, lr_schedule
        self.partitioner, self.shardings, self.hf_dir = partitioner, shardings, hf_dir

    @functools.cached_property
    def abstract_state(self):
        """The state's ShapeDtypeStructs with shardings (traced once, used several times)."""
        return state_lib.abstract(self.partitioner, self.task, self.tx, self.shardings)


def make_train_call(run):
    """The jitted call that runs `train.steps_per_call` steps over stacked batches, state donated."""
    config, partitioner = run.config, run.partitioner
    train_step = step_lib.make_train_step(run.task, run.tx, run.lr_schedule, seed=config.seed,
                                          microbatches=config.train.microbatches,
                                          skip_nonfinite=config.train.nan_policy == "skip")
    return partitioner.jit(step_lib.repeat_steps(train_step),
                           in_shardings=(run.shardings, partitioner.sharding(STACKED)),
                           out_shardings=(run.shardings, partitioner.replicated),
                           donate_argnums=0)


def restore_latest(workdir: str, config=None, keep_mesh: bool = False):
    """(run, params, step): a finished or running run's latest parameters, for inference.

    `config` defaults to the run's own `config.json`; the mesh becomes all local devices on the
    data axis, which any checkpoint restores onto (unless `keep_mesh`: then it is `config`'s).
    A PEFT run's checkpoint holds only what it trained: the rest comes from its base (`init_from`).
    """
    config = config_lib.load(workdir) if config is None else config
    if not keep_mesh:
        config.mesh.update(dict(data=-1, fsdp=1, tensor=1, stage=1, num_devices=0))
    run = setup(config, workdir)
    params, step = checkpoint.restore_params(workdir, run.abstract_state.params)  # no optimizer state
    if run.abstract_state.frozen:
        params = tree.join(params, base_params(run)[0].frozen)
    return run, params, step


def export_workdir(config, source: str, output: str, make_params, step: int) -> None:
    """Writes `output`: a workdir for serving with `config`, `source`'s tokenizer and one
    checkpoint at `step` holding only the parameters `make_params(abstract)` gives for the
    config's abstract parameters (no optimizer state: it evaluates, predicts, generates and
    serves as `init_from`; it does not resume training). Written under `output.partial` and
    renamed at the end, so a failed export leaves no half-written workdir."""
    partial = output.rstrip("/") + ".partial"
    with workdir_lib.lock(partial):  # a second export into `output` fails here, naming this one
        if os.path.exists(output) and os.listdir(output):
            raise FileExistsError(f"{output} is not empty: export into a new folder")
        for name in set(os.listdir(partial)) - {workdir_lib.LOCK_FILE}:  # a failed export's
            shutil.rmtree(os.path.join(partial, name))
        shutil.copytree(os.path.join(source, "tokenizer"), os.path.join(partial, "tokenizer"))
        run = setup(config, partial)
        abstract = run.abstract_state.params
        params = jax.tree.map(lambda value, leaf: jax.device_put(np.asarray(value).astype(leaf.dtype), leaf.sharding),
                              make_params(abstract), abstract)
        ckpt = checkpoint.Checkpointer(partial, async_save=False)
        ckpt.save(step, state_lib.TrainState(step=jax.numpy.asarray(step, jax.numpy.int32), params=params,
                                             opt_state={}))
        ckpt.close()
        config_lib.save(config, partial)
        if os.path.exists(output):
            os.rmdir(output)
        os.rename(partial, output)
    with contextlib.suppress(FileNotFoundError):  # process 0's, moved along with the folder
        os.remove(os.path.join(output, workdir_lib.LOCK_FILE))


def train_and_evaluate(config, workdir: str):
    """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final state.

    Everything that can fail before training fails before the first step: the config's values,
    the data (the eval batches are built here), the checkpoint to resume. A workdir that such a
    failure finds new is removed again; one that holds a run is left as it was.
    """
    config_lib.validate(config)
    with workdir_lib.claim(workdir) as claim:
        run = setup(config, workdir)
        quantize.check_trainable(run.abstract_state.params, quantize.from_config(config.model))
        log.info(memory.describe(memory.estimate(run)))  # before anything is allocated
        train_iter = run.task.train_iterator()
        evaluator = Evaluator(run, config)
        ckpt = checkpoint.Checkpointer(workdir, keep=config.checkpoint.keep,
                                       async_save=config.checkpoint.async_save)
        try:
            check_resumable(config, workdir, ckpt)
            state = restore_or_init(run, ckpt, train_iter, workdir)
            config_lib.record(config, workdir, int(state.step))  # only now: a failed restore leaves it
            claim.started()
            return train_loop(run, state, train_iter, evaluator, ckpt, workdir)
        finally:
            ckpt.close()


def train_loop(run, state, train_iter, evaluator, ckpt, workdir: str):
    """Steps from the state's step to `train.steps`: logs, saves, then evaluates at each period.

    SIGTERM or a first Ctrl-C logs the steps not yet logged, saves and returns; a second Ctrl-C
    stops at once. No step whose parameters or optimizer state went non-finite is ever saved.
    """
    config, partitioner, t = run.config, run.partitioner, run.config.train
    start_step = int(state.step)
    log.info("parameters: %s (%s trainable), mesh: %s", f"{metrics_lib.count_params(state.model_params):,}",
             f"{metrics_lib.count_params(state.params):,}", dict(partitioner.mesh.shape))
    steps_fn = make_train_call(run)
    compiled = {}
    profiler = Profiler(workdir, t.profile_steps)

    def run_steps(state, batches):
        shapes = tuple((key, x.shape) for key, x in sorted(batches.items()))  # steps, rows, length
        if shapes not in compiled:
            start = time.perf_counter()
            compiled[shapes] = steps_fn.lower(state, batches).compile()
            log.info("compiled a call for batches %s in %.1fs", dict(shapes), time.perf_counter() - start)
            log.debug("its memory: %s", compiled[shapes].memory_analysis())
        profiler.ran(compiled[shapes])
        return compiled[shapes](state, batches)

    writer = metrics_lib.MetricWriter(workdir, start_step)
    num_matmul_params = metrics_lib.matmul_params(config.model, state.model_params)
    peak = t.peak_flops or metrics_lib.measure_matmul_peak()
    stop = StopSignals()
    bar = metrics_lib.progress_bar(t.steps, start_step)
    interval = Interval(config.train.nan_policy)
    state_is_finite = jax.jit(lambda s: step_lib.all_finite((s.params, s.opt_state)))

    def log_interval(step):
        figures = interval.summary(step)
        now = time.perf_counter()
        elapsed = now - interval.start
        steps_done = len(interval.figures["loss"])
        figures["train/examples_per_sec"] = steps_done * t.batch_size / elapsed
        if interval.tokens:
            figures["train/tokens_per_sec"] = interval.tokens / elapsed
            figures["train/mfu"] = interval.flops / elapsed / (peak * partitioner.mesh.size)
        writer.write(step, figures)
        bar.set_postfix(loss=f"{figures['train/loss']:.4f}", ex_s=f"{figures['train/examples_per_sec']:.0f}")
        interval.reset(now)

    step = start_step
    try:
        while step < t.steps:
            k = min(t.steps_per_call, _steps_to_next_event(step, config))
            batches = run.task.fit_length(_stack([next(train_iter) for _ in range(k)]))
            length = run.task.tokens_in(batches)
            profiler.before_call(first=step == start_step)
            state, step_metrics = run_steps(state, partitioner.shard_batch(batches, STACKED))
            profiler.after_call(k, state)
            step += k
            tokens = k * t.batch_size * length
            interval.add(step_metrics, tokens, tokens * metrics_lib.flops_per_token(config.model, num_matmul_params, length))
            bar.update(k)
            stopping = bool(stop.raised)  # read once: a signal arriving below waits for the next call
            log_now = step % t.log_every == 0 or step == t.steps or stopping
            save_now = step % config.checkpoint.every == 0 or step == t.steps or stopping
            if log_now or save_now:
                interval.fetch(step)  # waits for the steps; a bad loss or gradient names its step
                interval.check_state(step, state_is_finite(state))  # one pass over the state
            if log_now:
                log_interval(step)
            if save_now:
                interval.check_before_save(step)
                ckpt.save(step, state, train_iter)
            if stopping:
                log.warning("%s: saved step %d, exiting", stop.raised, step)
                break
            if step % t.eval_every == 0 or step == t.steps:
                figures = evaluator(state.model_params)
                if not writer.has_hparams:  # linked to the eval metrics this task logs
                    writer.hparams(config, ["train/loss", *figures])
                writer.write(step, figures)
                if jax.process_index() == 0:
                    bar.write(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in figures.items()),
                              file=sys.stderr)
                interval.start = time.perf_counter()  # the eval's time is not the steps'
    finally:
        profiler.stop()
        bar.close()
        stop.restore()
        writer.close()
    if not stop.raised and config.sample.max_new_tokens > 0:
        # Every process takes part (the parameters are global arrays); process 0 prints.
        text = run.task.sample(state.model_params)
        if text is not None and jax.process_index() == 0:
            print(text, flush=True)
    return state


# Keys that fix what a saved data position means (batches of this many rows of these examples in
# this order): a run cannot resume with other values.
DATA_POSITION_KEYS = ("task.name", "seed", "train.batch_size", "data.name", "data.files", "data.prepared", "data.train_split",
                      "data.seq_len", "data.target_len", "data.tokenizer", "data.tokenizer_path",
                      "data.tokenizer_vocab_size", "data.text_key", "data.source_key", "data.target_key",
                      "data.bucket_batches", "task.pack")


# Model keys a resumed run may change: how the same function is computed or initialised, or
# how it trains (dropout). Any other model key changes what the saved parameters compute.
RESUMABLE_MODEL_KEYS = ("model.dtype", "model.remat", "model.attention", "model.dropout", "model.init_std",
                        "model.embed_init_std")


def check_resumable(config, workdir: str, ckpt) -> None:
    """Raises naming the keys whose change would make a resumed run read its data from the wrong
    place (the saved position counts batches of the saved batch size), or make its saved
    parameters compute another function (e.g. `model.scale_embeddings`)."""
    step = ckpt.latest_step()
    if step is None or not os.path.isfile(os.path.join(workdir, "config.json")):
        return
    saved = config_lib.load(workdir)
    get = config_lib.get
    model_keys = [key for key in config_lib.flatten(config.model.to_dict(), "model.") if key not in RESUMABLE_MODEL_KEYS]
    changed = [f"{key}={get(config, key)!r} (saved {get(saved, key)!r})"
               for key in (*DATA_POSITION_KEYS, *model_keys) if get(config, key) != get(saved, key)]
    if changed:
        raise ValueError(
            f"{workdir} resumes at step {step}, but {', '.join(changed)}: its saved data position counts "
            "batches of the saved run's examples, and its saved parameters were trained for the saved "
            "model. Resume with the saved values, or start a new workdir from this one with "
            f"--config.init_from={workdir}.")


def restore_or_init(run, ckpt, train_iter, workdir: str):
    """This run's latest checkpoint, else `init_from`'s parameters, else a fresh init. Frozen
    parameters (a PEFT base, a distillation teacher) always come from `init_from` and the task's
    `parameter_sources`: checkpoints do not hold them."""
    config = run.config
    if config.init_from and os.path.abspath(config.init_from) == os.path.abspath(workdir):
        raise ValueError("init_from names this run's own workdir")
    resume = ckpt.latest_step() is not None
    if resume and not run.abstract_state.frozen:
        return _resumed(ckpt, ckpt.restore(run.abstract_state, train_iter))
    state, report = base_params(run)
    if resume:
        restored = ckpt.restore(run.abstract_state, train_iter).replace(frozen=state.frozen)
        origins = [config.init_from] * bool(config.init_from) + [s.path for s in run.task.parameter_sources()]
        return _resumed(ckpt, restored, f" (frozen parameters from {', '.join(origins)})")
    write_params_report(workdir, state, report)
    return prune.start(run, state)  # masks of step 0 (a resumed run has them in its checkpoint)


def _resumed(ckpt, state, note: str = ""):
    """Logs the step a run resumes at (the latest that verified: corrupt ones were moved aside)."""
    log.info("resuming from %s step %d%s", ckpt.directory, int(state.step), note)
    return state


def base_params(run):
    """(state, report): a fresh state whose parameters come from `init_from` where it has them.

    `report` lists the parameters `init_from` provided (`loaded`) and those that start fresh
    (`new`). A fresh parameter that would stay frozen is an error naming it.
    """
    config = run.config
    state = state_lib.init(run.partitioner, run.task, run.tx, jax.random.key(config.seed), run.shardings)
    params = state.model_params
    names = tree.names(params)
    loaded = {}
    if config.init_from:
        log.info("initializing parameters from %s", config.init_from)
        if run.hf_dir:  # straight into the run's layout, parameter by parameter
            shardings = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.sharding
                         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
            loaded = convert.import_params(run.hf_dir, quantize.float_model(config.model), shardings)
        else:
            loaded, _ = checkpoint.restore_params(config.init_from, run.abstract_state.model_params)
        if config.init_skip:
            skip = re.compile(config.init_skip)
            loaded, _ = tree.split(loaded, lambda name: not skip.search(name))
    sources = {source.name: load_source(source) for source in run.task.parameter_sources()}
    loaded = tree.join(run.task.pretrained(sources), loaded)  # e.g. a distillation teacher
    loaded = quantize.quantize_params(loaded, run.abstract_state.model_params,
                                      quantize.from_config(config.model))  # QLoRA: a quantized base
    if not loaded:
        return state, {"loaded": [], "new": names}
    params, new = merge_params(params, loaded)
    stuck = [n for n in new if not run.task.trainable(n)]
    if stuck:
        raise ValueError(f"init_from {config.init_from} has no {', '.join(stuck)}, and "
                         f"peft.method={config.peft.method!r} freezes them: they would stay random "
                         "(train them with peft.trainable, or start from a checkpoint that has them)")
    trainable, frozen = tree.split(params, run.task.trainable)
    new_set = set(new)
    return (state.replace(params=trainable, frozen=frozen),
            {"loaded": [n for n in names if n not in new_set], "new": new})


def load_source(source) -> dict:
    """The parameters of a task's `ParameterSource`: a jaxlm workdir's latest (restored on the
    source config's mesh, a PEFT run's joined with its base) or a Hugging Face checkpoint's."""
    log.info("loading %s parameters from %s", source.name, source.path)
    hf_dir = convert.resolve(source.path)
    if hf_dir is not None:
        return convert.import_params(hf_dir, quantize.float_model(source.config.model))
    return restore_latest(source.path, source.config, keep_mesh=True)[1]


def write_params_report(workdir: str, state, report: dict) -> None:
    """`workdir/params.json`: parameter counts and names (loaded, new, frozen) at the start."""
    params = state.model_params
    sizes = {"/".join(k): int(v.size) for k, v in flax.traverse_util.flatten_dict(params).items()}
    frozen = tree.names(state.frozen)
    figures = {"total": sum(sizes.values()),
               "trainable": sum(sizes.values()) - sum(sizes[n] for n in frozen),
               "loaded": sum(sizes[n] for n in report["loaded"]),
               "new": report["new"], "frozen": frozen}
    log.info("parameters: %s total, %s trainable (%.2f%%), %s loaded, %d new (params.json names them)",
             f"{figures['total']:,}", f"{figures['trainable']:,}", 100 * figures["trainable"] / figures["total"],
             f"{figures['loaded']:,}", len(report["new"]))
    log.debug("new parameters: %s", ", ".join(report["new"]) or "none")
    if jax.process_index() == 0:
        tmp = os.path.join(workdir, "params.json.tmp")
        with open(tmp, "w") as f:
            json.dump(figures, f, indent=1)
        os.replace(tmp, os.path.join(workdir, "params.json"))


def merge_params(params, loaded: dict):
    """(`params` with the leaves `loaded` has, placed like them; names of the leaves that keep
    their fresh values, e.g. heads a pretrained backbone does not have). Shapes must match."""
    flat = flax.traverse_util.flatten_dict(loaded)
    fresh = []

    def take(path, leaf):
        name = tuple(str(getattr(k, "key", k)) for k in path)
        if name not in flat:
            fresh.append("/".join(name))
            return leaf
        if flat[name].shape != leaf.shape:
            raise ValueError(f"init_from: {'/'.join(name)} has shape {flat[name].shape}, this "
                             f"config builds {leaf.shape}")
        return jax.device_put(flat[name].astype(leaf.dtype), leaf.sharding)

    return jax.tree_util.tree_map_with_path(take, params), fresh


class Evaluator:
    """Evaluates on the first `train.eval_batches` batches of the eval split, kept on device.

    The batches are built when the evaluator is, before training: an eval split that cannot be
    read or encoded fails the run before its first step, not at its first evaluation."""

    def __init__(self, run, config):
        self.run = run
        self.split = config.data.eval_split
        eval_step = step_lib.make_eval_step(run.task)

        def evaluate(params, batches):
            sums = jax.lax.map(lambda b: eval_step(params, b), batches)
            return run.task.summarize(jax.tree.map(lambda x: x.sum(0), sums))

        self.fn = run.partitioner.jit(
            evaluate, in_shardings=(run.shardings.model_params, run.partitioner.sharding(STACKED)),
            out_shardings=run.partitioner.replicated)
        try:
            batches = list(run.task.eval_batches(self.split, config.train.eval_batches))
        except (ValueError, KeyError) as e:
            raise ValueError(f"eval split {self.split!r} of {config.data.name!r}: {e}") from e
        if not batches:
            raise ValueError(f"eval split {self.split!r} of {config.data.name!r} gives no batch of "
                             f"train.batch_size={config.train.batch_size} rows")
        self.batches = run.partitioner.shard_batch(_stack(batches), STACKED)

    def __call__(self, params) -> dict:
        figures = jax.device_get(self.fn(params, self.batches))
        figures.update(self.run.task.generation_metrics(params, self.split))
        return {f"eval/{k}": float(v) for k, v in figures.items()}


def _steps_to_next_event(step: int, config) -> int:
    """Steps until the next log, eval, checkpoint or the end, so calls stop exactly there."""
    t = config.train
    periods = (t.log_every, t.eval_every, config.checkpoint.every)
    return min([p - step % p for p in periods] + [t.steps - step])


def _stack(batches: list) -> dict:
    return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _merge(pending: list) -> dict:
    """The per-step metrics of the pending calls, fetched and joined into one array per key."""
    values = jax.device_get(pending)
    return {k: np.concatenate([np.atleast_1d(v[k]) for v in values]) for k in values[0]}


class Interval:
    """The per-step figures of the steps since the last log, fetched from the device only when
    they are logged or a save needs them checked, and the tokens and FLOPs those steps computed.

    Every step's loss and gradient are checked once: under train.nan_policy='stop' a non-finite
    one raises (its state is never saved); under 'skip' the step dropped its update (it also
    checked the state it made), and a save after an interval in which every step was skipped
    raises instead (the run is stuck). At each log and save the state itself is checked too: a
    finite loss and gradient can still make non-finite parameters.
    """

    def __init__(self, nan_policy: str):
        self.nan_policy = nan_policy
        self.calls, self.figures = [], {}
        self.tokens, self.flops = 0, 0.0
        self.steps_since_save = self.skipped_since_save = 0
        self.start = time.perf_counter()

    def add(self, step_metrics, tokens: int, flops: float) -> None:
        self.calls.append(step_metrics)
        self.tokens += tokens
        self.flops += flops

    def fetch(self, step: int) -> dict:
        if self.calls:
            new = _merge(self.calls)
            self.calls = []
            self._check(new["finite"], step)
            self.figures = {k: np.concatenate([self.figures[k], v]) if k in self.figures else v
                            for k, v in new.items()}
        return self.figures

    def summary(self, step: int) -> dict:
        """Means over the interval (the learning rate is the last step's)."""
        merged = self.fetch(step)
        figures = {f"train/{k}": float(np.mean(v)) for k, v in merged.items() if k not in ("finite", "learning_rate")}
        figures["train/learning_rate"] = float(merged["learning_rate"][-1])
        return figures

    def reset(self, now: float) -> None:
        self.figures, self.start = {}, now
        self.tokens, self.flops = 0, 0.0

    def check_state(self, step: int, state_is_finite) -> None:
        """Raises unless the state after `step` is finite (its loss and gradients were)."""
        if not bool(state_is_finite):
            raise NonFiniteLoss(
                f"the parameters or optimizer state went non-finite by step {step} though the loss "
                "and gradients stayed finite (an update too large: optim.lr?); the last checkpoint "
                "was left as it was")

    def check_before_save(self, step: int) -> None:
        """After `fetch`: raises if every step since the last save was skipped (no progress)."""
        if self.steps_since_save and self.skipped_since_save == self.steps_since_save:
            raise NonFiniteLoss(
                f"every one of the {self.steps_since_save} steps since the last save (up to step "
                f"{step}) was non-finite and skipped (train.nan_policy='skip'): the run makes no "
                "progress; the last checkpoint was left as it was. Lower optim.lr or check the data.")
        self.steps_since_save = self.skipped_since_save = 0

    def _check(self, finite: np.ndarray, step: int) -> None:
        bad = int((~finite).sum())
        self.steps_since_save += len(finite)
        self.skipped_since_save += bad
        if not bad:
            return
        first = step - len(finite) + int(np.argmin(finite)) + 1
        if self.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss or gradient at step {first} (train.nan_policy='stop'); "
                                "the last checkpoint was left as it was")
        log.warning("skipped %d non-finite steps (the first at step %d) before step %d", bad, first, step)


class Profiler:
    """`train.profile_steps` steps traced with `jax.profiler` into WORKDIR/profile, from the second
    call on (the first one compiles): open it in TensorBoard's profile plugin, or load the
    `perfetto_trace.json.gz` at ui.perfetto.dev; `tools/profile_report.py` sums it by kind of op
    and by part of the model, which it reads from the optimized HLO of the traced programs,
    written beside the trace (`program.<n>.hlo.txt`: each op's `op_name` names its layer)."""

    def __init__(self, workdir: str, steps: int):
        self.dir, self.left, self.active = os.path.join(workdir, "profile"), steps, False
        self.programs = {}

    def ran(self, program) -> None:
        """Notes a compiled program called while tracing."""
        if self.active:
            self.programs.setdefault(id(program), program)

    def before_call(self, first: bool) -> None:
        if self.left > 0 and not first and not self.active:
            jax.profiler.start_trace(self.dir, create_perfetto_trace=True)
            self.active = True

    def after_call(self, steps: int, state) -> None:
        if self.active:
            self.left -= steps
            if self.left <= 0:
                jax.block_until_ready(state)
                self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            traces = glob.glob(os.path.join(self.dir, "plugins", "profile", "*", ""))
            if jax.process_index() == 0 and traces:
                folder = max(traces, key=os.path.getmtime)
                for n, program in enumerate(self.programs.values()):
                    with open(os.path.join(folder, f"program.{n}.hlo.txt"), "w") as f:
                        f.write(program.as_text())
            log.info("profile of the traced steps written under %s", self.dir)


class StopSignals:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks after each call, so
    it can log, save and return. A second Ctrl-C ends the process at once (the default action:
    checkpoints are written atomically, and the kernel drops the workdir lock).

    `raised` is the signal's name once one arrived (falsy before)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.raised = ""
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        except ValueError:  # not the main thread (e.g. inside a notebook worker)
            self._previous = {}

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        log.warning("%s: stopping after this call (saving first); Ctrl-C again ends it at once", self.raised)

    def restore(self):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
