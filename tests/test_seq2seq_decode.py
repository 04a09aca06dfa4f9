"""Encoder-decoder decoding (jaxlm.infer.seq2seq_decoding) against recomputation without a KV cache.

The references run the whole model on a fixed-length decoder input: attention is causal, so the
logits at position t do not depend on the placeholder tokens after t.
"""

import functools
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import config as config_lib, models
from jaxlm.infer import seq2seq_decoding

MAX_LEN = 24  # the model's cache size
EOS = 1


@functools.lru_cache
def _setup(scan_layers: bool, positions: str = "learned"):
    """A small random T5 (large init, so that its predictions vary), its params, and a jitted
    full forward pass (encoder tokens, decoder inputs) -> logits. `positions="sinusoidal"` adds
    absolute positions to the relative biases (the cache must feed each step its own)."""
    c = config_lib.default_config().model
    c.update(dict(name="t5", vocab_size=60, num_layers=2, num_heads=2, emb_dim=32, max_len=MAX_LEN,
                  norm="rmsnorm", mlp="geglu", tie_embeddings=False, init_std=0.5,
                  scan_layers=scan_layers, positions=positions))
    model = models.get(c)
    decoder_tokens = np.zeros((3, MAX_LEN), np.int32)
    params = jax.jit(model.init)(jax.random.key(0), _source(), decoder_tokens)["params"]
    forward = jax.jit(lambda enc, dec: model.apply({"params": params}, enc, dec))
    return model, params, lambda enc, dec: np.asarray(forward(enc, dec), np.float64)


def _source():
    tokens = np.random.RandomState(0).randint(2, 60, (3, 7)).astype(np.int32)
    tokens[1, 4:] = 0  # padding, masked out of the encoder and the cross-attention
    return tokens


def _log_softmax(logits):
    logits = logits - logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def _greedy_reference(forward, enc, *, max_len, eos_id, vocab_size=60):
    """Greedy decoding by re-running the full model on the growing prefix at every step."""
    batch = enc.shape[0]
    dec = np.zeros((batch, max_len), np.int32)  # the start token (0), then the outputs
    out, finished = np.zeros((batch, max_len), np.int32), np.zeros(batch, bool)
    for t in range(max_len):
        new = np.where(finished, 0, forward(enc, dec)[:, t, :vocab_size].argmax(-1))
        out[:, t], finished = new, finished | (new == eos_id)
        if t + 1 < max_len:
            dec[:, t + 1] = new
    return out


def _eos_length(tokens, eos_id):
    tokens = list(tokens)
    return tokens.index(eos_id) + 1 if eos_id in tokens else len(tokens)


def _log_prob(forward, enc_row, tokens, *, eos_id, vocab_size):
    """Summed log-probability of `tokens` up to and including the EOS."""
    dec = np.concatenate([[0], tokens[:-1]])[None].astype(np.int32)
    log_probs = _log_softmax(forward(enc_row[None], dec)[0, :, :vocab_size])
    length = _eos_length(tokens, eos_id)
    return sum(log_probs[t, tokens[t]] for t in range(length))


def _normalized_score(forward, enc_row, tokens, *, vocab_size, length_penalty):
    """The log-probability divided by the GNMT length penalty."""
    log_prob = _log_prob(forward, enc_row, tokens, eos_id=EOS, vocab_size=vocab_size)
    return log_prob / ((5 + _eos_length(tokens, EOS)) / 6) ** length_penalty


def _beam_reference(forward, enc_row, *, beam_size, max_len, eos_id, vocab_size, length_penalty):
    """Plain-Python beam search with alive and finished pools, re-running the full model for
    every beam at every step and never stopping early."""
    penalty = lambda length: ((5 + length) / 6) ** length_penalty
    alive, finished = [((), 0.0)], []
    for t in range(max_len):
        candidates = []
        for tokens, score in alive:
            dec = np.zeros((1, max_len), np.int32)
            dec[0, 1:t + 1] = tokens
            log_probs = _log_softmax(forward(enc_row[None], dec)[0, t, :vocab_size])
            candidates += [(tokens + (v,), score + log_probs[v]) for v in range(vocab_size)]
        best = sorted(candidates, key=lambda c: -c[1])[:2 * beam_size]
        finished += [(tokens, score / penalty(t + 1)) for tokens, score in best if tokens[-1] == eos_id]
        alive = [c for c in best if c[0][-1] != eos_id][:beam_size]
    finished = sorted(finished, key=lambda c: -c[1])[:beam_size]
    last = [(tokens, score / penalty(max_len)) for tokens, score in alive]
    tokens = max(finished + last, key=lambda c: c[1])[0]
    return np.pad(np.array(tokens), (0, max_len - len(tokens)))


def _assert_pad_after_eos(tokens, eos_id):
    for row in tokens:
        if eos_id in row:
            assert not row[list(row).index(eos_id) + 1:].any(), row


@pytest.mark.parametrize("scan_layers, positions", [(True, "learned"), (False, "learned"), (False, "sinusoidal")])
def test_cached_greedy_equals_recompute(scan_layers, positions):
    model, params, forward = _setup(scan_layers, positions)
    enc = _source()
    # an EOS that row 0 emits by step 5, so that the test covers finished rows
    eos_id = int(_greedy_reference(forward, enc, max_len=6, eos_id=-1)[0, 5])
    expected = _greedy_reference(forward, enc, max_len=MAX_LEN, eos_id=eos_id)
    assert eos_id in expected[0] and len(set(expected[1].tolist())) > 2
    got = seq2seq_decoding.decode(model, params, enc, max_len=MAX_LEN, eos_id=eos_id)
    assert got.dtype == np.int32 and got.shape == (3, MAX_LEN)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_beam_size_one_is_greedy(scan_layers):
    model, params, _ = _setup(scan_layers)
    enc = _source()
    greedy = seq2seq_decoding.decode(model, params, enc, max_len=12, eos_id=EOS)
    np.testing.assert_array_equal(seq2seq_decoding.decode(model, params, enc, max_len=12, eos_id=EOS,
                                                 beam_size=1), greedy)
    # the beam-search code path itself, with one beam: without a length penalty nothing can beat
    # the first EOS, so it is greedy
    one_beam = seq2seq_decoding._beam_search(model, params, enc, enc != 0, np.zeros((len(enc), 12), np.int32),
                                             max_len=12, eos_id=EOS, decoder_start_id=0, beam_size=1,
                                             vocab_size=60, length_penalty=0.0)
    np.testing.assert_array_equal(np.asarray(one_beam), greedy)


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 3.0])
def test_wide_beam_finds_the_best_of_all_sequences(length_penalty):
    """With more beams than sequences nothing is pruned: the result is the exact best."""
    model, params, forward = _setup(True)
    enc, vocab_size, max_len = _source(), 3, 3
    got = seq2seq_decoding.decode(model, params, enc, max_len=max_len, eos_id=EOS, beam_size=27,
                         vocab_size=vocab_size, length_penalty=length_penalty)
    greedy = seq2seq_decoding.decode(model, params, enc, max_len=max_len, eos_id=EOS, vocab_size=vocab_size)
    valid = [np.array(s) for s in itertools.product(range(vocab_size), repeat=max_len)
             if not any(s[_eos_length(s, EOS):])]
    for row in range(len(enc)):
        score = functools.partial(_normalized_score, forward, enc[row], vocab_size=vocab_size,
                                  length_penalty=length_penalty)
        np.testing.assert_array_equal(got[row], max(valid, key=score))
        if length_penalty == 0:
            assert score(got[row]) >= score(greedy[row])


@pytest.mark.parametrize("scan_layers", [True, False])
def test_beam_search_matches_reference(scan_layers):
    model, params, forward = _setup(scan_layers)
    enc, kwargs = _source(), dict(beam_size=3, max_len=6, eos_id=EOS, vocab_size=8,
                                  length_penalty=0.6)
    got = seq2seq_decoding.decode(model, params, enc, **kwargs)
    greedy = seq2seq_decoding.decode(model, params, enc, max_len=6, eos_id=EOS, vocab_size=8)
    assert (got != greedy).any()  # else the reference would not test the beams' bookkeeping
    for row in range(len(enc)):
        np.testing.assert_array_equal(got[row], _beam_reference(forward, enc[row], **kwargs))


class _Markov(nn.Module):
    """A decoder whose next-token log-probabilities depend only on the previous token (`table`
    [previous, next]); no encoder, an empty cache."""

    table: tuple
    max_len: int = 8

    @property
    def vocab_size(self) -> int:
        return len(self.table)

    def encode(self, tokens, mask=None, deterministic: bool = True):
        return jnp.zeros((tokens.size, 1))

    @nn.compact
    def decode(self, encoded, encoder_mask, tokens, positions=None, deterministic: bool = True,
               decode: bool = False):
        self.variable("cache", "unused", jnp.zeros, ())
        return jnp.log(jnp.asarray(self.table, jnp.float32))[tokens]


def test_finished_beams_do_not_end_the_search_for_a_longer_better_one():
    """EOS first is likeliest (0.5), then 'B EOS' (0.27); 'A A A A A A' (0.2 * 0.98^5) scores best
    once the length penalty counts its length. A search that let the two short finished
    sequences hold both beams stopped there and returned 'EOS'."""
    tiny = 1e-9  # pad is never likely
    table = ((tiny, 0.5, 0.2, 0.3),  # after the start token (pad): EOS, A, B
             (tiny, 0.25, 0.25, 0.5),
             (tiny, 0.01, 0.98, 0.01),  # after A: mostly A
             (tiny, 0.9, 0.05, 0.05))  # after B: mostly EOS
    model = _Markov(table)
    source = np.ones((1, 3), np.int32)
    decode = functools.partial(seq2seq_decoding.decode, model, {}, source, max_len=6, eos_id=1)
    np.testing.assert_array_equal(decode(), [[1, 0, 0, 0, 0, 0]])  # greedy
    np.testing.assert_array_equal(decode(beam_size=2, length_penalty=2.0), [[2] * 6])
    np.testing.assert_array_equal(decode(beam_size=2, length_penalty=0.0), [[1, 0, 0, 0, 0, 0]])


def test_sampling_is_seeded():
    model, params, _ = _setup(True)
    sample = functools.partial(seq2seq_decoding.decode, model, params, _source(), max_len=12, eos_id=EOS,
                               temperature=1.0)
    np.testing.assert_array_equal(sample(seed=0), sample(seed=0))
    assert (sample(seed=0) != sample(seed=1)).any()
    greedy = seq2seq_decoding.decode(model, params, _source(), max_len=12, eos_id=EOS)
    np.testing.assert_array_equal(sample(seed=3, top_k=1), greedy)


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.0), dict(beam_size=3)])
def test_pad_after_eos(kwargs):
    model, params, _ = _setup(True)
    decode = functools.partial(seq2seq_decoding.decode, model, params, _source(), max_len=12, **kwargs)
    free = decode(eos_id=59)
    # an EOS after which row 0 would go on with other tokens: its first new token from position 3
    t = next(t for t in range(3, 11) if free[0, t] not in free[0, :t] and free[0, t + 1:].any())
    eos_id = int(free[0, t])
    got = decode(eos_id=eos_id)
    assert eos_id in got
    _assert_pad_after_eos(got, eos_id)
    if "beam_size" not in kwargs:  # the EOS changes nothing before it
        np.testing.assert_array_equal(got[0], np.where(np.arange(12) <= t, free[0], 0))


@pytest.mark.parametrize("kwargs", [dict(), dict(temperature=1.0), dict(beam_size=3)])
def test_vocab_size_limits_tokens(kwargs):
    model, params, _ = _setup(True)
    decode = functools.partial(seq2seq_decoding.decode, model, params, _source(), max_len=12, eos_id=EOS,
                               **kwargs)
    assert decode().max() >= 5  # the full vocabulary would use the excluded ids
    assert decode(vocab_size=5).max() < 5


def test_argument_errors():
    model, params, _ = _setup(True)
    decode = functools.partial(seq2seq_decoding.decode, model, params, _source(), eos_id=EOS)
    with pytest.raises(ValueError, match=r"max_len=25 .*model\.max_len=24"):
        decode(max_len=MAX_LEN + 1)
    with pytest.raises(ValueError, match="beam_size=1"):
        decode(max_len=4, beam_size=2, temperature=1.0)
    with pytest.raises(ValueError, match="eos_id=7"):
        seq2seq_decoding.decode(model, params, _source(), max_len=4, eos_id=7, vocab_size=5)


def _attention_logits(intermediates, stack, layer, kind, batch):
    """q k^T [batch, heads, q_len, k_len] of one attention layer from captured projections."""
    proj = intermediates[stack][layer][kind]
    q, k = (proj[name]["__call__"][0] for name in ("query", "key"))
    return np.einsum("bqhd,bkhd->bhqk", q.reshape(batch, -1, *q.shape[-2:]), k.reshape(batch, -1, *k.shape[-2:]))


@pytest.mark.parametrize("scale_queries", [True, False])
def test_fresh_t5_attention_has_t5_scale(scale_queries):
    """Fresh attention logits have std about 1 whether 1/sqrt(head_dim) multiplies the logits
    (`model.scale_queries`, the configs' default) or is folded into the query kernel's
    initialization as in Mesh TF T5 (std (d_model * d_kv)^-1/2 against d_model^-1/2 for keys);
    otherwise they are sqrt(head_dim) times too large and every softmax is nearly one-hot.
    Shape and init of configs/t5_multi30k.py: width 256, heads of 64, init_std 0.05 (old
    initialization: logits std 5.1, 5 times T5's)."""
    c = config_lib.default_config().model
    c.update(dict(name="t5", vocab_size=100, num_layers=1, num_heads=4, head_dim=64, emb_dim=256, mlp_dim=512,
                  max_len=16, norm="rmsnorm", norm_eps=1e-6, mlp="geglu", tie_embeddings=False, init_std=0.05,
                  scan_layers=False, scale_queries=scale_queries))
    model = models.get(c)
    rng = np.random.RandomState(0)
    enc, dec = rng.randint(2, 100, (8, 24)).astype(np.int32), rng.randint(2, 100, (8, 16)).astype(np.int32)
    variables = model.init(jax.random.key(0), enc, dec)
    _, state = model.apply(variables, enc, dec, capture_intermediates=True, mutable=["intermediates"])
    for stack, kind in [("encoder", "attn"), ("decoder", "attn"), ("decoder", "cross_attn")]:
        logits = _attention_logits(state["intermediates"], stack, "layers_0", kind, 8)
        logits = logits / 8 if scale_queries else logits  # 1/sqrt(head_dim) after the projection
        # T5's own initialization gives std 1 on the unit-RMS (normalized) inputs of attention
        assert 0.3 < logits.std() < 2.0, (stack, kind, logits.std())
    probs = jax.nn.softmax(logits, -1)  # cross-attention over the 24 source tokens
    assert float(probs.max(-1).mean()) < 0.3
