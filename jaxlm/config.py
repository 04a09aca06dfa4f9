"""The one place where every config knob gets its default.

Run configs in `configs/` start from `default_config()` and change what differs. The returned
ConfigDict is locked: setting a key that does not exist (in a config file or with
`--config.a.b=v` on the command line) raises an error naming the key and the closest valid one.
"""

import importlib.util
import json
import os
import time

import jax
import ml_collections

# Ordered logical-axis rules: for each logical axis the first rule whose mesh axes are still
# free is used, so activations (which carry `batch` first) fall back to replicated `embed`.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("residual", ("data", "fsdp")),  # the residual stream's tokens; + tensor with sequence_parallel
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),  # grouped-query attention's key/value heads (num_kv_heads % tensor == 0)
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("layers", "stage"),  # the scanned layer stack: pipeline stages own contiguous layers
    ("stage", "stage"),
    ("norm", None),
)


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = ""  # a jaxlm workdir, a Hugging Face folder or a package shipping one: initial parameters
    c.init_skip = ""  # regex of parameter names not taken from init_from (e.g. "^head/": a new head)

    c.task = ml_collections.ConfigDict(dict(
        name="causal_lm",  # causal_lm | sft | mlm_nsp | span_corruption | seq2seq | image_classification
        mlm_probability=0.15,  # mlm_nsp: share of tokens to predict (80% [MASK], 10% random, 10% kept)
        whole_word_masking=False,  # mlm_nsp: mask whole words (wordpiece '##' pieces go together)
        nsp=True,  # mlm_nsp: sentence pairs with a next-sentence label (False: MLM on one segment)
        noise_density=0.15,  # span_corruption: share of tokens corrupted
        mean_noise_span_length=3.0,  # span_corruption
        extra_ids=100,  # span_corruption/seq2seq: sentinel ids appended to the vocabulary (T5)
        source_prefix="",  # seq2seq: text put before every source, e.g. "translate English to German: "
        beam_size=4,  # seq2seq, captioning, vqa: beam search width for eval/bleu and samples (1: greedy)
        eval_bleu_batches=0,  # seq2seq, captioning, vqa: eval batches decoded for BLEU/CIDEr/answers (0: all)
        label_smoothing=0.0,  # seq2seq: share of the target spread over the vocabulary in training
                              # (eval/loss stays the plain cross-entropy)
        contrastive="pairs",  # contrastive: pairs (data.source_key, target_key) | simcse (data.text_key texts)
        temperature=0.05,  # contrastive: initial temperature (its inverse, the scale, is learned; <= 100)
        retrieval_pairs=0,  # contrastive: eval/retrieval_top1 over the first N eval pairs (0: all; -1: none)
        pack=True,  # sft: several conversations per row (segment ids keep them apart); False: one per row
        task_metrics="",  # sft: "TASK=METRIC,..." generation metric per JSONL "task" (exact_match, accuracy,
                          # bleu, entity_f1); tasks not named: exact_match
        eval_generate=0,  # sft: eval conversations answered by greedy generation (0: all; -1: none)
        generate_tokens=64,  # sft: most new tokens of a generated answer
        mixture="",  # multitask: "NAME=TASK:DATASET:WEIGHT,..." parts on one BERT (configs/multitask.py)
        contrastive_loss="clip",  # image_text: clip (softmax InfoNCE) | siglip (pairwise sigmoid)
        projection_dim=128,  # image_text: the shared embedding width
        projection_bias=False,  # image_text: the projections add a bias (SigLIP's text head)
        image_projection=True,  # image_text: False: the image tower's pooled features are its embedding
                                # (SigLIP's attention pooling; projection_dim is then image_model.emb_dim)
        text_init_from="",  # image_text: the text tower's start (a jaxlm run or Hugging Face BERT folder)
        image_init_from="",  # image_text, captioning, vqa: the image tower's start (a jaxlm ViT run; its head is dropped)
    ))

    c.model = ml_collections.ConfigDict(dict(
        name="gpt",
        vocab_size=0,  # 0: taken from the tokenizer, rounded up to `vocab_multiple`
        vocab_multiple=1,  # pad the vocabulary so it divides over the `tensor` axis
        max_len=256,  # positions the model supports (>= data.seq_len)
        num_layers=4,
        num_heads=4,
        num_kv_heads=0,  # grouped-query attention: key/value heads (0: num_heads; 1: multi-query)
        head_dim=0,  # 0: emb_dim // num_heads
        emb_dim=128,
        mlp_dim=0,  # 0: 4 * emb_dim
        mlp="gelu",  # gelu | gelu_exact | quick_gelu (CLIP) | relu | swiglu | geglu
        norm="layernorm",  # layernorm | rmsnorm | rmsnorm_plus_one (Gemma: x / rms * (1 + scale))
        norm_eps=1e-5,
        positions="learned",  # learned | rotary | sinusoidal (fixed, Vaswani et al.; t5: added to its relative biases)
        rope_theta=10000.0,
        # Rotary frequencies for long contexts (layers.RopeScaling): none | linear | llama3.
        rope_scaling=ml_collections.ConfigDict(dict(
            type="none", factor=1.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=8192)),
        sliding_window=0,  # Mistral: each query sees the last N keys (0: all)
        qkv_bias=False,  # Qwen2: biases on the query, key and value projections only
        qk_norm=False,  # Qwen3: RMSNorm of each query and key head before rotary
        attn_softcap=0.0,  # Gemma 2: attention logits cap * tanh(logits / cap) (0: off)
        logit_softcap=0.0,  # Gemma 2: output logits cap * tanh(logits / cap) (0: off)
        query_pre_attn_scalar=0.0,  # Gemma 2/3: queries times its -1/2 power (0: head_dim's)
        post_branch_norm=False,  # Gemma 2/3: also normalize each branch's output before the residual add
        sliding_window_pattern=0,  # Gemma 2 (2), Gemma 3 (6): every Nth layer global, the others in
                                   # the sliding window (needs scan_layers=False; 0: all layers alike)
        local_rope_theta=0.0,  # Gemma 3: rotary base of the local layers, unscaled (0: rope_theta)
        scale_embeddings=False,  # Gemma: token embeddings times sqrt(emb_dim)
        attention="auto",  # auto | cpu | xla | cudnn | splash: auto picks by backend (layers.attention_implementation)
        scale_queries=True,  # attention logits times 1/sqrt(head_dim); False: that factor is folded
                             # into the query kernel's initialisation instead (Mesh TF T5 checkpoints)
        dropout=0.0,
        use_bias=False,
        tie_embeddings=True,
        scan_layers=True,
        remat="none",  # none | dots | full
        dtype="float32",
        param_dtype="float32",
        init_std=0.02,
        embed_init_std=0.0,  # token embeddings' init std (0: init_std); T5 draws them with 1.0
        type_vocab_size=2,  # bert: segment (token type) embeddings
        num_decoder_layers=0,  # t5: 0 means num_layers
        relative_buckets=32,  # t5: relative position bias buckets
        relative_max_distance=128,  # t5
        patch_size=4,  # vit
        pool="cls",  # vit: cls | mean | map (no class token; SigLIP's multihead attention pooling);
                     # bert: cls (the pooler on [CLS]) | mean (over the real tokens: sentence-transformers')
        pre_norm=False,  # vit: a LayerNorm on the embeddings before the encoder (CLIP's pre_layrnorm)
        pixel_mean=(),  # vit: the model sees (pixels - mean) / std per channel, pixels in [0, 1] (a
        pixel_std=(),   # checkpoint's preprocessor_config.json image_mean, image_std); (): as they are
        causal=True,  # gpt: False attends both ways (SigLIP's text tower)
        text_pool="mean",  # image_text text tower: mean (over real tokens) | eos (first model.eos_id, CLIP) |
                           # max_id (the largest id: older CLIP configs, whose EOS is the largest id) |
                           # last (the last position of the whole padded row, padding attended: SigLIP)
        eos_id=-1,  # image_text text tower with text_pool=eos: the id whose first position is pooled
        image_size=0,  # vit: 0 means taken from the data (square images)
        num_classes=0,  # vit/cnn: 0 means taken from the data
        # Quantized layers (jaxlm/compress/quantize.py). Stored weights (qat False) are an
        # inference format (tools/quantize.py writes one) or a frozen QLoRA base (peft.method=lora).
        quant=ml_collections.ConfigDict(dict(
            weights="none",  # none | int8 (per output channel) | int4 | nf4 (per group_size inputs)
            activations="none",  # none | int8: inputs quantized per row at run time (W8A8 with int8)
            group_size=128,  # int4/nf4: inputs sharing one scale (0: one scale per output channel)
            qat=False,  # quantization-aware training: float weights, fake-quantized forward, STE
            targets="",  # regex of Dense layer paths to quantize ('' = all), e.g. "attn|mlp"
            embeddings=True,  # quantize token embedding tables too (one scale per row)
        )),
    ))

    c.data = ml_collections.ConfigDict(dict(
        name="jaxlm_tiny_shakespeare",  # a jaxlm TFDS builder or any TFDS catalog name
        files="",  # glob(s) for the jaxlm_text_files builder, comma-separated
        prepared="",  # causal_lm: a corpus directory of tools/prepare_data.py (ArrayRecord windows), read
                      # with random access instead of tokenizing `name` in memory; its tokenizer is the run's
        data_dir="",  # where TFDS keeps prepared data ('' = TFDS default)
        text_key="text",
        train_split="train",
        eval_split="validation",
        tokenizer="char",  # char | byte | sentencepiece | wordpiece | huggingface (tokenizer.json)
        tokenizer_path="",  # sentencepiece .model file
        seq_len=64,  # tokens per example (seq2seq: source tokens)
        target_len=0,  # seq2seq/span_corruption targets (0: seq_len for seq2seq, derived for T5 noise)
        source_key="source",  # seq2seq: the feature holding the source text (multi30k: en)
        target_key="target",  # seq2seq: the feature holding the target text (multi30k: de)
        tokenizer_vocab_size=8000,  # sentencepiece trained on the train split when no tokenizer_path
        augment="none",  # image_classification: none | shift
        pad_multiple=16,  # classification/tagging: train batches are cut to their longest row, rounded
                          # up to this (one compile per length; 0: always seq_len; 1 process only);
                          # seq2seq: both sides to the longest source or target
        bucket_batches=0,  # seq2seq, classification, tagging train: rows of similar lengths share a batch, sorted in windows
                           # of this many batches (0: off); with pad_multiple a short batch is a short
                           # step (best with train.steps_per_call=1: a call is cut to its longest row)
        case_feature=False,  # token_classification: each piece also gets its word's capitalisation
                             # (lower, Capitalised, CAPS, no letters) as a learned embedding
        holdout_classes="",  # image_text: classes (e.g. "5,9") left out of training, for zero-shot
        image_channels=3,  # image_text caption folders: images converted to 1 (gray) or 3 (RGB) channels
    ))

    # image_text: the dual encoder's image tower (a ViT; `model` is its text tower); captioning, vqa:
    # the encoder (`model` is the T5 decoder).
    c.image_model = ml_collections.ConfigDict({**c.model.to_dict(), **dict(
        name="vit", num_layers=4, emb_dim=128, num_heads=4, mlp="gelu_exact", use_bias=True, patch_size=4,
        max_len=0, norm_eps=1e-6)})

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        batch_size=32,  # global batch, split over processes and the data/fsdp mesh axes
        microbatches=1,  # gradient accumulation: the batch is cut into this many pieces
        steps_per_call=1,  # train steps run inside one jitted call (cuts per-step overhead)
        log_every=10,
        eval_every=250,
        eval_batches=20,  # 0: the whole eval split
        nan_policy="stop",  # stop | skip: what a non-finite loss does
        peak_flops=0.0,  # per device, for MFU; 0: measured with a matmul at start-up
        profile_steps=0,  # > 0: trace this many steps (after the first call) into WORKDIR/profile
        # XLA's persistent compilation cache ('' off): later runs load compiled programs from here
        compilation_cache=os.environ.get("JAXLM_COMPILATION_CACHE", "~/.cache/jaxlm/xla"),
    ))

    # Parameter-efficient fine-tuning (jaxlm/peft): what trains on top of init_from's model.
    c.peft = ml_collections.ConfigDict(dict(
        method="full",  # full | lora | adapter | prompt | prefix | bitfit | head
        rank=8,  # lora
        alpha=16.0,  # lora: updates scaled by alpha / rank
        dropout=0.0,  # lora: dropout on the adapters' input
        targets="query|value",  # lora: regex searched in layer paths, e.g. "attn/(query|key|value|out)|mlp"
        adapter="houlsby",  # adapter: houlsby (after attention and MLP) | pfeiffer (after the MLP)
        adapter_dim=64,  # adapter bottleneck width
        num_tokens=20,  # prompt: soft tokens before the input; prefix: keys/values per layer
        trainable="",  # regex of more parameters to train (e.g. "norm" with adapters)
        frozen="",  # regex of parameters to freeze under any method (e.g. "embed" with full)
    ))

    # Pruning (jaxlm/compress/prune.py): masks in the optimizer state, applied in every step.
    c.prune = ml_collections.ConfigDict(dict(
        method="none",  # none | magnitude | nm (N:M) | heads (attention heads and MLP neurons)
        sparsity=0.5,  # magnitude: final share of zeros in the target kernels
        initial_sparsity=0.0,  # magnitude: share of zeros at begin_step (the schedule's start)
        scope="layer",  # magnitude: layer (every kernel, every layer of a stack) | global (all together)
        targets=r"attn/(query|key|value|out)/kernel|mlp/(wi|wg|wo)/kernel",  # magnitude/nm: regex of names
        begin_step=0,  # magnitude/nm: first mask update (0: the loaded weights, before the first step)
        end_step=0,  # magnitude/nm: last update, at `sparsity` (= begin_step: one-shot); < train.steps
        every=100,  # magnitude/nm: steps between mask updates (polynomial schedule, Zhu & Gupta)
        n=2,  # nm: weights kept in every group of m consecutive inputs of a kernel
        m=4,  # nm: group size along the kernel's input (contraction) axis
        heads_pruned=0.0,  # heads: share of attention heads removed in every layer
        mlp_pruned=0.0,  # heads: share of MLP neurons removed in every layer
        importance_batches=8,  # heads: train batches whose loss gradients score heads and neurons
    ))

    # Knowledge distillation (task.name='distillation', jaxlm/compress/distill.py): the run's model
    # is the student; a frozen teacher runs inside the same step.
    c.distill = ml_collections.ConfigDict(dict(
        teacher="",  # a jaxlm workdir (its config.json and latest checkpoint) or a Hugging Face folder/package
        student_task="classification",  # the student's own task: data, heads and metrics come from it
        temperature=2.0,  # softmax temperature of the soft targets (the KL term is scaled by T^2)
        soft_weight=0.5,  # weight of T^2 * KL(teacher || student) on the logits
        hard_weight=0.5,  # weight of the student's cross-entropy on the labels
        hidden_weight=0.0,  # weight of the MSE between projected student and teacher hidden states
        attention_weight=0.0,  # weight of the KL between student and teacher attention maps
        init_layers="",  # e.g. "0,2,4": student layers start as these teacher layers (plus the
                         # teacher's embeddings and heads where shapes match); "": init_from or scratch
        teacher_logits="",  # classification: a file of precomputed train logits (tools/teacher_logits.py)
    ))

    c.optim = ml_collections.ConfigDict(dict(
        lr=1e-3,  # -1: auto, the usual rate of peft.method (jaxlm.peft.LEARNING_RATES), after overrides
        end_lr=1e-4,  # the cosine decays from lr to end_lr at `decay_steps`
        warmup_steps=100,
        decay_steps=0,  # 0: train.steps
        schedule="cosine",  # cosine | linear | constant
        b1=0.9,
        b2=0.99,
        eps=1e-8,
        weight_decay=0.1,  # applied to kernels and embeddings, never to norms and biases
        clip_norm=1.0,  # 0: no clipping
        layer_decay=1.0,  # < 1: layer-wise lr decay, layer i of L at lr * layer_decay^(L - i) (optim.layer_depths)
    ))

    c.checkpoint = ml_collections.ConfigDict(dict(
        every=500,
        keep=3,
        async_save=True,
    ))

    c.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # -1 fills the devices left over by the other axes
        fsdp=1,
        tensor=1,
        stage=1,
        num_devices=0,  # use the first N devices (0: all of them)
        rules=DEFAULT_RULES,
        sequence_parallel=False,  # also shard the residual stream's tokens over `tensor`
    ))

    # Pipeline parallelism runs whenever mesh.stage > 1 (jaxlm/models/pipeline_parallel.py).
    c.pipeline = ml_collections.ConfigDict(dict(
        microbatches=0,  # microbatches flowing through the stages (0: mesh.stage)
        schedule="gpipe",  # gpipe | circular (each stage holds `repeats` non-adjacent layer groups)
        repeats=1,  # circular: layer groups per stage (gpipe: 1)
    ))

    # Many hosts: the same program on every process. Empty/0 values are read from JAXLM_COORDINATOR,
    # JAXLM_NUM_PROCESSES, JAXLM_PROCESS_ID, else left to JAX's auto-detection (TPU pods, SLURM).
    c.distributed = ml_collections.ConfigDict(dict(
        coordinator="",  # host:port of process 0
        num_processes=0,
        process_id=-1,
    ))

    c.sample = ml_collections.ConfigDict(dict(
        prompt="\n",
        max_new_tokens=200,
        temperature=0.8,
        top_k=0,
        top_p=1.0,
    ))
    c.lock()
    return c


def from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a `configs/*.py` file (what `--config=path[:arg]` loads)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def save(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the resolved config as JSON (`config.json`) into `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, f"config.json.tmp{os.getpid()}")  # every process of a run writes it
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(workdir, "config.json"))


def record(config: ml_collections.ConfigDict, workdir: str, step: int) -> None:
    """Saves `config` as the run's `config.json` and appends it, with the step it starts at, to
    `config_history.jsonl`: a resumed run with changed values keeps the earlier ones on record."""
    save(config, workdir)
    if jax.process_index() == 0:
        entry = {"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "config": json.loads(config.to_json_best_effort())}
        with open(os.path.join(workdir, "config_history.jsonl"), "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")


def load(workdir: str) -> ml_collections.ConfigDict:
    """Reads the config a run wrote into `workdir`, on top of today's defaults."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {workdir!r} is not a jaxlm workdir")
    with open(path) as f:
        values = json.load(f)
    config = default_config()
    update(config, values)
    model = values.get("model", {})
    if model.get("name") == "t5" and "scale_queries" not in model:
        config.model.scale_queries = False  # T5 runs from before the key: folded into the init
    return config


def update(config: ml_collections.ConfigDict, values: dict, prefix: str = "") -> None:
    """Sets nested `values` on a locked config; unknown keys raise naming the full key."""
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in config:
            raise KeyError(f"unknown config key {name!r}; valid keys here: {sorted(config.keys())}")
        if isinstance(config[key], ml_collections.ConfigDict):
            update(config[key], value, prefix=f"{name}.")
        else:
            if isinstance(value, list):
                value = _tuplify(value)
            config[key] = value


def get(config: ml_collections.ConfigDict, key: str):
    """The value of a dotted key, e.g. get(config, "train.batch_size")."""
    for part in key.split("."):
        config = config[part]
    return config


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'a.b.c': value} of a nested dict (e.g. a config's `to_dict()`)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _tuplify(value):
    return tuple(_tuplify(v) if isinstance(v, list) else v for v in value)


# (key, check, what it must be): values a run can check before it writes anything.
RANGES = (
    ("train.steps", lambda v: v >= 0, "0 (initialize only, nothing saved) or more"),
    ("train.batch_size", lambda v: v >= 1, "at least 1"),
    ("train.microbatches", lambda v: v >= 1, "at least 1"),
    ("train.steps_per_call", lambda v: v >= 1, "at least 1"),
    ("train.log_every", lambda v: v >= 1, "at least 1"),
    ("train.profile_steps", lambda v: v >= 0, "0 (off) or more"),
    ("train.eval_every", lambda v: v >= 1, "at least 1"),
    ("train.eval_batches", lambda v: v >= 0, "0 (the whole split) or more"),
    ("train.nan_policy", lambda v: v in ("stop", "skip"), "'stop' or 'skip'"),
    ("checkpoint.every", lambda v: v >= 1, "at least 1"),
    ("checkpoint.keep", lambda v: v >= 0, "0 (keep all) or more"),
    ("optim.lr", lambda v: v == -1 or 0 <= v < float("inf"),
     "-1 (auto: the usual rate of peft.method) or finite and not negative"),
    ("optim.end_lr", lambda v: 0 <= v < float("inf"), "finite and not negative"),
    ("optim.warmup_steps", lambda v: v >= 0, "0 or more"),
    ("optim.decay_steps", lambda v: v >= 0, "0 (train.steps) or more"),
    ("optim.b1", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.b2", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("optim.clip_norm", lambda v: v >= 0, "0 (no clipping) or more"),
    ("optim.layer_decay", lambda v: 0 < v <= 1, "in (0, 1] (1: off)"),
    ("data.seq_len", lambda v: v >= 1, "at least 1"),
    ("data.target_len", lambda v: v >= 0, "0 (derived) or more"),
    ("data.bucket_batches", lambda v: v >= 0, "0 (off) or more"),
    ("task.eval_generate", lambda v: v >= -1, "-1 (none), 0 (all) or more"),
    ("task.generate_tokens", lambda v: v >= 1, "at least 1"),
    ("task.label_smoothing", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("model.num_kv_heads", lambda v: v >= 0, "0 (num_heads) or more"),
    ("model.sliding_window", lambda v: v >= 0, "0 (off) or more"),
    ("model.sliding_window_pattern", lambda v: v >= 0, "0 (off) or more"),
    ("model.attn_softcap", lambda v: v >= 0, "0 (off) or more"),
    ("model.logit_softcap", lambda v: v >= 0, "0 (off) or more"),
    ("model.attention", lambda v: v in ("auto", "cpu", "xla", "cudnn", "splash"), "auto | cpu | xla | cudnn | splash"),
    ("sample.max_new_tokens", lambda v: v >= 0, "0 (no sample) or more"),
    ("sample.temperature", lambda v: v >= 0, "0 (greedy) or more"),
)


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises a ValueError naming every key whose value is out of range (a run calls this
    before it writes anything)."""
    problems = []
    for key, check, expected in RANGES:
        value = get(config, key)
        if not check(value):
            problems.append(f"{key}={value!r} must be {expected}")
    if config.data.case_feature and config.task.name != "token_classification":
        problems.append(f"data.case_feature=True is read by task.name=token_classification only, "
                        f"not {config.task.name!r}")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
