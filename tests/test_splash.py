"""The Pallas splash-attention kernel (model.attention=splash), run interpreted on CPU: it must
compute what jaxlm's additive-bias attention computes, in values and gradients, for every mask it
takes as structure, inside a model and sharded over a mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib, models
from jaxlm.models import layers, splash
from jaxlm.parallel.partitioner import Partitioner

LENGTH = 128  # splash's smallest tile


def qkv(kv_heads, heads=4, batch=2, head_dim=16):
    q = jax.random.normal(jax.random.key(0), (batch, LENGTH, heads, head_dim)) / 2
    k, v = (jax.random.normal(jax.random.key(i), (batch, LENGTH, kv_heads, head_dim)) for i in (1, 2))
    return q, k, v


def packed_segments(batch=2):
    """Two rows of three packed examples of different lengths, then padding (id 0)."""
    ids = np.zeros((batch, LENGTH), np.int32)
    for row, cuts in enumerate([(40, 90, 120), (17, 100, 128)]):
        start = 0
        for segment, end in enumerate(cuts, 1):
            ids[row, start:end] = segment
            start = end
    return jnp.asarray(ids)


@pytest.mark.parametrize("kv_heads,window,segments,softcap", [
    (4, 0, False, 0.0), (2, 0, True, 0.0), (1, 24, False, 0.0), (2, 24, True, 0.0), (2, 24, True, 1.5)])
def test_splash_equals_the_additive_mask_in_value_and_gradient(kv_heads, window, segments, softcap):
    """Multi-head, grouped and multi-query heads; causal, sliding window, packed segment ids;
    Gemma 2's capped logits."""
    q, k, v = qkv(kv_heads)
    segment_ids = packed_segments() if segments else None
    bias = layers.causal_bias(jnp.arange(LENGTH), LENGTH, window)
    if segments:
        bias = bias + layers.segment_bias(segment_ids)
    d_out = jax.random.normal(jax.random.key(3), q.shape)
    fused = lambda q, k, v: splash.attention(q, k, v, causal=True, window=window, segment_ids=segment_ids,
                                             softcap=softcap)
    dense = lambda q, k, v: layers.dot_product_attention(q, k, v, bias, "cpu", softcap)
    np.testing.assert_allclose(fused(q, k, v), dense(q, k, v), atol=2e-5)
    grads = [jax.grad(lambda *a: jnp.sum(f(*a) * d_out), (0, 1, 2))(q, k, v) for f in (fused, dense)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, atol=1e-4)


def splash_model(**overrides):
    c = config_lib.default_config().model
    c.update(dict(vocab_size=64, max_len=LENGTH, num_layers=2, num_heads=4, num_kv_heads=2, emb_dim=32,
                  positions="rotary", norm="rmsnorm", mlp="swiglu", attention="splash"))
    c.update(overrides)
    return c


def test_a_decoder_with_splash_attention_computes_the_cpu_decoders_logits_and_gradients():
    fused, plain = models.get(splash_model()), models.get(splash_model(attention="cpu"))
    tokens = jax.random.randint(jax.random.key(1), (2, LENGTH), 0, 64)
    params = nn.unbox(plain.init(jax.random.key(0), tokens)["params"])
    segment_ids = packed_segments()
    loss = lambda model: lambda p: jnp.mean(model.apply({"params": p}, tokens, segment_ids=segment_ids) ** 2)
    np.testing.assert_allclose(fused.apply({"params": params}, tokens, segment_ids=segment_ids),
                               plain.apply({"params": params}, tokens, segment_ids=segment_ids), atol=1e-4)
    for got, want in zip(jax.tree.leaves(jax.grad(loss(fused))(params)), jax.tree.leaves(jax.grad(loss(plain))(params))):
        np.testing.assert_allclose(got, want, atol=1e-5)
    # Cached decoding (one token at a time) is not splash's: it runs XLA's attention, same tokens.
    cache = fused.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"]
    step, _ = fused.apply({"params": params, "cache": cache}, tokens[:, :1], decode=True, mutable=["cache"])
    np.testing.assert_allclose(step[:, 0], plain.apply({"params": params}, tokens)[:, 0], atol=1e-4)


def test_splash_sharded_over_data_and_tensor_equals_one_device():
    model = models.get(splash_model())
    tokens = jax.random.randint(jax.random.key(1), (4, LENGTH), 0, 64)
    segment_ids = jnp.concatenate([packed_segments()] * 2)
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    want = model.apply({"params": params}, tokens, segment_ids=segment_ids)
    c = config_lib.default_config()
    c.mesh.update(dict(data=2, fsdp=2, tensor=2))
    partitioner = Partitioner.from_config(c)
    got = partitioner.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s))(params, tokens, segment_ids)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_splash_by_name_refuses_what_it_cannot_take_and_auto_does_not_pick_it_on_cpu():
    assert layers.attention_implementation("auto", jnp.float32) == "cpu"
    odd = models.get(splash_model(max_len=200))
    with pytest.raises(ValueError, match="splash.*length 100 is not a multiple of 128"):
        odd.init(jax.random.key(0), jnp.zeros((1, 100), jnp.int32))
    padded = models.get(splash_model())
    with pytest.raises(ValueError, match="splash.*no additive bias"):
        padded.init(jax.random.key(0), jnp.zeros((1, LENGTH), jnp.int32), key_mask=jnp.ones((1, LENGTH)))


def test_alternating_local_and_global_layers_need_an_unrolled_stack():
    model = models.get(splash_model(attention="cpu", sliding_window=8, sliding_window_pattern=2))
    with pytest.raises(ValueError, match="sliding_window_pattern.*scan_layers=False"):
        model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
