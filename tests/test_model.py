"""The GPT on the shared core: causality, layer stacking, cached decoding, variants, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from jaxlm import config as config_lib, models
from jaxlm.infer import sampling
from jaxlm.models import layers
from jaxlm.parallel.partitioner import Partitioner
from jaxlm.tasks import base as base_task


def model_config(**overrides):
    c = config_lib.default_config().model
    c.update(dict(vocab_size=50, max_len=32, num_layers=2, num_heads=2, emb_dim=32))
    c.update(overrides)
    return c


def init(model, length=16):
    tokens = jnp.zeros((1, length), jnp.int32)
    return nn.unbox(model.init(jax.random.key(0), tokens)["params"])


VARIANTS = [
    dict(),
    dict(positions="rotary", norm="rmsnorm", mlp="swiglu"),
    dict(positions="rotary", num_heads=4, num_kv_heads=2, sliding_window=5, qk_norm=True,
         attention="xla"),
    dict(tie_embeddings=False, use_bias=True, mlp="gelu_exact"),
    dict(scan_layers=False, remat="full"),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_changing_a_token_never_changes_earlier_logits(overrides):
    model = models.get(model_config(**overrides))
    params = init(model)
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    changed = tokens.at[:, 9].set((tokens[:, 9] + 7) % 50)
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-4


def test_scanned_and_unrolled_stacks_compute_the_same_function():
    scanned = models.get(model_config())
    unrolled = models.get(model_config(scan_layers=False))
    params = init(scanned)
    layers = params["decoder"]["layers"]
    unrolled_params = dict(params)
    unrolled_params["decoder"] = {f"layers_{i}": jax.tree.map(lambda x: x[i], layers) for i in range(2)}
    assert jax.tree.structure(unrolled_params) == jax.tree.structure(init(unrolled))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    np.testing.assert_allclose(scanned.apply({"params": params}, tokens),
                               unrolled.apply({"params": unrolled_params}, tokens), atol=1e-5)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_same_gradients(remat):
    base = models.get(model_config())
    params = init(base)
    batch = {"inputs": jax.random.randint(jax.random.key(1), (2, 16), 0, 50),
             "targets": jax.random.randint(jax.random.key(2), (2, 16), 0, 50)}

    def grads(model):
        logits = lambda p: model.apply({"params": p}, batch["inputs"])
        return jax.grad(lambda p: base_task.cross_entropy(logits(p), batch["targets"])[0])(params)

    for a, b in zip(jax.tree.leaves(grads(base)), jax.tree.leaves(grads(models.get(model_config(remat=remat))))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides", [
    dict(), dict(positions="rotary", scan_layers=False), dict(positions="sinusoidal"),
    dict(positions="rotary", num_heads=4, num_kv_heads=1, sliding_window=6, qkv_bias=True)])
def test_cached_decoding_equals_full_recompute(overrides):
    model = models.get(model_config(**overrides))
    params = init(model)
    prompt = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]], np.int32)
    cached = sampling.generate(model, params, prompt, 20, temperature=0.0)

    # Greedy by recomputing the whole sequence each step; causality lets the sequence be padded
    # to a fixed length so that one compiled forward serves every step.
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    tokens = np.zeros((2, 25), np.int32)
    tokens[:, :5] = prompt
    for t in range(5, 25):
        tokens[:, t] = np.argmax(forward(tokens)[:, t - 1], -1)
    np.testing.assert_array_equal(cached, tokens[:, 5:])


def test_cached_logits_equal_full_logits():
    model = models.get(model_config(positions="rotary"))
    params = init(model)
    tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, 50)
    full = model.apply({"params": params}, tokens)
    cache = model.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"]
    cache = jax.tree.map(jnp.zeros_like, cache)
    positions = jnp.broadcast_to(jnp.arange(12), tokens.shape)
    prefill, vars_ = model.apply({"params": params, "cache": cache}, tokens[:, :8], positions[:, :8],
                                 decode=True, mutable=["cache"])
    step, _ = model.apply({"params": params, **vars_}, tokens[:, 8:], positions[:, 8:],
                          decode=True, mutable=["cache"])
    np.testing.assert_allclose(prefill, full[:, :8], atol=1e-5)
    np.testing.assert_allclose(step, full[:, 8:], atol=1e-5)


def test_generation_runs_past_the_context_length_and_sampling_filters_apply():
    model = models.get(model_config(max_len=16))
    params = init(model, 16)
    out = sampling.generate(model, params, np.array([[1, 2, 3]]), 40, seed=0, temperature=1.0, top_k=5)
    assert out.shape == (1, 40)
    a = sampling.generate(model, params, np.array([[1, 2, 3]]), 10, seed=1, temperature=1.0)
    b = sampling.generate(model, params, np.array([[1, 2, 3]]), 10, seed=1, temperature=1.0)
    np.testing.assert_array_equal(a, b)

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = [int(sampling.next_token(logits, jax.random.key(i), 1.0, 0, 0.7)[0]) for i in range(200)]
    assert set(draws) == {0, 1}  # 0.5 < 0.7 <= 0.8: the two most likely tokens only
    draws = [int(sampling.next_token(logits, jax.random.key(i), 1.0, 3, 1.0)[0]) for i in range(200)]
    assert set(draws) == {0, 1, 2}


def test_every_parameter_has_logical_axes_and_large_ones_are_sharded():
    model = models.get(model_config(num_heads=4, emb_dim=64))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    for path, leaf in jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)):
        assert isinstance(leaf, nn.LogicallyPartitioned), jax.tree_util.keystr(path)
        assert len(leaf.names) == len(leaf.value.shape), jax.tree_util.keystr(path)

    c = config_lib.default_config()
    c.mesh.update(dict(data=1, fsdp=4, tensor=2))
    partitioner = Partitioner.from_config(c)
    params = partitioner.jit(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]),
                             out_shardings=partitioner.shardings_of(boxed))()
    wi = params["decoder"]["layers"]["mlp"]["wi"]["kernel"]  # [layers, embed, mlp]
    assert wi.sharding.spec == jax.sharding.PartitionSpec("stage", "fsdp", "tensor")  # stage: 1 here
    assert wi.addressable_shards[0].data.shape == (2, 16, 128)
    query = params["decoder"]["layers"]["attn"]["query"]["kernel"]  # [layers, embed, heads, kv]
    assert query.addressable_shards[0].data.shape == (2, 16, 2, 16)


def test_compute_dtype_and_parameter_dtype_are_separate():
    model = models.get(model_config(dtype="bfloat16"))
    params = init(model)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    logits = model.apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32  # the loss and softmax stay in float32
    hidden = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params)
    assert "bf16" in str(hidden)  # the matmuls run in bfloat16
    reference = models.get(model_config()).apply({"params": params}, tokens)
    np.testing.assert_allclose(logits, reference, atol=0.1)


def test_attention_backward_matches_autodiff_of_the_plain_formula():
    from jaxlm.models import layers
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 3, 4)) for i in range(3))
    bias = jax.random.normal(jax.random.key(3), (1, 3, 6, 6)) + layers.causal_bias(jnp.arange(6), 6)

    def plain(q, k, v, bias):
        probs = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias, -1)
        return jnp.einsum("bhqk,bkhd->bqhd", probs, v)

    d_out = jax.random.normal(jax.random.key(4), q.shape)
    loss = lambda f: lambda *a: jnp.sum(f(*a) * d_out)
    np.testing.assert_allclose(layers.attention(q, k, v, bias), plain(q, k, v, bias), atol=1e-6)
    for got, want in zip(jax.grad(loss(layers.attention), (0, 1, 2, 3))(q, k, v, bias),
                         jax.grad(loss(plain), (0, 1, 2, 3))(q, k, v, bias)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_sampling_never_picks_the_padding_of_a_padded_vocabulary():
    model = models.get(model_config(vocab_size=56, tie_embeddings=False, use_bias=True))
    params = init(model)
    # The final norm outputs ones whatever the input, and only the padding ids score: they would win.
    params["final_norm"] = {"scale": jnp.zeros_like(params["final_norm"]["scale"]),
                            "bias": jnp.ones_like(params["final_norm"]["bias"])}
    params["lm_head"]["kernel"] = jnp.zeros_like(params["lm_head"]["kernel"]).at[:, 50:].set(1.0)
    out = sampling.generate(model, params, np.array([[1, 2, 3]]), 30, temperature=0.0, vocab_size=50)
    assert out.max() < 50
    assert sampling.generate(model, params, np.array([[1, 2, 3]]), 5, temperature=0.0).max() >= 50


@pytest.mark.parametrize("use_bias", [False, True])
def test_layer_norm_matches_flax_in_value_and_gradient(use_bias):
    from jaxlm.models import layers
    cfg = layers.block_config(model_config(use_bias=use_bias))
    x = jax.random.normal(jax.random.key(0), (6, 32)) * 3 + 1
    ours, reference = layers.LayerNorm(cfg), nn.LayerNorm(use_bias=use_bias, epsilon=cfg.norm_eps)
    params = {"scale": jax.random.normal(jax.random.key(1), (32,))}
    if use_bias:
        params["bias"] = jax.random.normal(jax.random.key(2), (32,))
    d_out = jax.random.normal(jax.random.key(3), x.shape)
    loss = lambda module: lambda p, x: jnp.sum(module.apply({"params": p}, x) * d_out)
    np.testing.assert_allclose(ours.apply({"params": params}, x), reference.apply({"params": params}, x),
                               atol=1e-5)
    got, want = jax.grad(loss(ours), (0, 1))(params, x), jax.grad(loss(reference), (0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_grouped_query_attention_is_multi_head_attention_with_shared_key_value_heads():
    """num_kv_heads=2 of 4 computes what 4-head attention computes with each key/value kernel
    repeated for its group of two query heads."""
    gqa = models.get(model_config(num_heads=4, num_kv_heads=2, positions="rotary"))
    mha = models.get(model_config(num_heads=4, positions="rotary"))
    params = init(gqa)
    attn = params["decoder"]["layers"]["attn"]
    assert attn["key"]["kernel"].shape == (2, 32, 2, 8)  # [layers, embed, kv_heads, head_dim]
    repeated = {**attn, **{name: {"kernel": jnp.repeat(attn[name]["kernel"], 2, axis=2)}
                           for name in ("key", "value")}}
    mha_params = {**params, "decoder": {"layers": {**params["decoder"]["layers"], "attn": repeated}}}
    assert jax.tree.structure(mha_params) == jax.tree.structure(init(mha))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    np.testing.assert_allclose(gqa.apply({"params": params}, tokens),
                               mha.apply({"params": mha_params}, tokens), atol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_attention_implementations_agree_in_value_and_gradient(kv_heads):
    """jaxlm's custom-gradient attention ('cpu') and jax.nn.dot_product_attention ('xla'), with
    a causal sliding window, a padding mask and grouped key/value heads."""
    from jaxlm.models import layers
    q = jax.random.normal(jax.random.key(0), (2, 7, 4, 8))
    k, v = (jax.random.normal(jax.random.key(i), (2, 7, kv_heads, 8)) for i in (1, 2))
    padding = layers.padding_bias(jnp.array([[1] * 7, [1] * 5 + [0] * 2]))
    bias = padding + layers.causal_bias(jnp.arange(7), 7, window=3)
    d_out = jax.random.normal(jax.random.key(3), q.shape)
    loss = lambda impl: lambda q, k, v: jnp.sum(layers.dot_product_attention(q, k, v, bias, impl) * d_out)
    np.testing.assert_allclose(layers.dot_product_attention(q, k, v, bias, "cpu"),
                               layers.dot_product_attention(q, k, v, bias, "xla"), atol=1e-5)
    for got, want in zip(jax.grad(loss("cpu"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert layers.attention_implementation("auto", jnp.float32) == "cpu"  # this machine's backend
    with pytest.raises(ValueError, match="model.attention='flash'"):
        layers.attention_implementation("flash", jnp.float32)


def test_sliding_window_hides_keys_older_than_the_window():
    model = models.get(model_config(positions="rotary", sliding_window=4))
    params = init(model)
    tokens = jax.random.randint(jax.random.key(1), (1, 16), 0, 50)
    changed = tokens.at[:, 2].set((tokens[:, 2] + 7) % 50)
    a, b = model.apply({"params": params}, tokens), model.apply({"params": params}, changed)
    # Two layers of a 4-key window: position 2 reaches up to position 2 + 2 * 3 = 8.
    assert np.abs(a[:, 2:9] - b[:, 2:9]).max() > 1e-4
    np.testing.assert_array_equal(a[:, 9:], b[:, 9:])


def test_llama3_rope_scaling_keeps_short_wavelengths_and_stretches_long_ones():
    from jaxlm.models import layers
    plain = layers.rope_frequencies(64, 500000.0, None)
    scaled = layers.rope_frequencies(64, 500000.0, layers.RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    wavelength = 2 * np.pi / plain
    np.testing.assert_allclose(scaled[wavelength < 8192 / 4], plain[wavelength < 8192 / 4])
    np.testing.assert_allclose(scaled[wavelength > 8192], plain[wavelength > 8192] / 8)
    between = (wavelength >= 2048) & (wavelength <= 8192)
    assert between.any() and np.all((scaled[between] <= plain[between]) & (scaled[between] >= plain[between] / 8))


@pytest.mark.parametrize("overrides", [dict(positions="rotary", num_heads=4, num_kv_heads=2), dict()])
def test_batched_left_padded_prompts_decode_as_each_alone_and_stop_at_stop_ids(overrides):
    model = models.get(model_config(max_len=32, **overrides))
    params = init(model)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [2, 7], [1, 8, 2, 8, 1]]
    chunks = list(sampling.stream(model, params, prompts, 12, chunk=5))
    assert [c.shape[1] for c in chunks] == [1, 5, 5, 1]
    batched = np.concatenate(chunks, 1)
    for row, prompt in enumerate(prompts):
        alone = sampling.generate(model, params, np.array([prompt]), 12, temperature=0.0)
        np.testing.assert_array_equal(batched[row], alone[0])
    stop = batched[0, 6]
    first = int(np.argmax(batched[0] == stop))
    cut = np.concatenate(list(sampling.stream(model, params, prompts, 12, stop_ids=[stop], chunk=5)), 1)
    np.testing.assert_array_equal(cut[0, :first], batched[0, :first])
    assert (cut[0, first:] == -1).all()


def test_label_smoothing_is_cross_entropy_against_smoothed_targets():
    """cross_entropy(label_smoothing=e) equals optax's cross-entropy with (1 - e) on the label and
    e spread over the vocabulary; e = 0 is the plain loss."""
    import optax
    logits = jax.random.normal(jax.random.key(0), (3, 5, 11)) * 3
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    weights = (jnp.arange(5) < 4).astype(jnp.float32)[None].repeat(3, 0)
    smoothed = optax.smooth_labels(jax.nn.one_hot(targets, 11), 0.1)
    want = jnp.sum(optax.softmax_cross_entropy(logits, smoothed) * weights)
    got, _, weight = base_task.cross_entropy(logits, targets, weights, label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = base_task.cross_entropy(logits, targets, weights)[0]
    assert weight == 12 and abs(float(plain - got)) > 1e-2


def test_dropout_drops_its_rate_and_keeps_the_expectation():
    """The 8-bit mask: 26/256 of a large array dropped for rate 0.1, the mean kept, a new mask per
    key, masks shaped like the input (odd last axis), the identity when deterministic."""
    from jaxlm.models import layers
    x = jnp.full((512, 1001), 2.0)
    y = layers.dropout(x, 0.1, jax.random.key(0))
    dropped = float(jnp.mean(y == 0))
    assert abs(dropped - 26 / 256) < 2e-3, dropped
    np.testing.assert_allclose(float(jnp.mean(y)), 2.0, rtol=3e-3)
    np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 2.0 / (1 - 26 / 256)], rtol=1e-6)
    assert float(jnp.mean((y == 0) != (layers.dropout(x, 0.1, jax.random.key(1)) == 0))) > 0.15
    assert layers.dropout(x, 0.001, jax.random.key(0)) is x  # rounds to no dropout
    assert float(jnp.max(jnp.abs(layers.dropout(x, 1.0, jax.random.key(0))))) == 0
    module = layers.Dropout(0.5)
    assert module.apply({}, x, deterministic=True) is x
    z = module.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})
    assert abs(float(jnp.mean(z == 0)) - 0.5) < 5e-3


@pytest.mark.parametrize("family", ["gpt", "t5"])
def test_scaled_embeddings_equal_a_table_scaled_by_sqrt_width(family):
    """`model.scale_embeddings` multiplies the token vectors by sqrt(emb_dim): the same logits
    as the unscaled model whose table is that much larger (untied output, so only the input moves)."""
    c = model_config(name=family, tie_embeddings=False, embed_init_std=0.5, norm="rmsnorm")
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 50, (2, 8)), jnp.int32)
    args = (tokens, tokens) if family == "t5" else (tokens,)
    plain = models.get(c)
    params = nn.unbox(plain.init(jax.random.key(0), *args)["params"])
    assert abs(float(params["embed"]["embedding"].std()) - 0.5) < 0.05  # embed_init_std
    c.scale_embeddings = True
    scaled_params = {**params, "embed": {"embedding": params["embed"]["embedding"] / 32 ** 0.5}}
    np.testing.assert_allclose(models.get(c).apply({"params": scaled_params}, *args),
                               plain.apply({"params": params}, *args), rtol=1e-4, atol=1e-4)


def test_sinusoidal_positions_are_vaswanis_code_and_carry_the_absolute_position():
    """PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(...); a GPT with them tells the same
    tokens apart by where they stand, as learned positions do and as a model without any would not."""
    d, p = 16, np.arange(40)[:, None]
    expected = np.zeros((40, d))
    expected[:, 0::2], expected[:, 1::2] = np.sin(p / 10000 ** (np.arange(0, d, 2) / d)), np.cos(p / 10000 ** (np.arange(0, d, 2) / d))
    np.testing.assert_allclose(layers.sinusoidal_positions(jnp.arange(40), d, jnp.float32), expected, atol=1e-5)
    model = models.get(model_config(positions="sinusoidal"))
    params = init(model)
    assert "pos_embedding" not in params
    logits = model.apply({"params": params}, jnp.full((1, 16), 7, jnp.int32))
    assert np.abs(logits[0, 1:] - logits[0, 0]).max(-1).min() > 1e-3  # every later position differs from the first
