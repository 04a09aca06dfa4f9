"""Decoding an encoder-decoder (T5) with a KV cache: greedy, sampling and beam search.

`decode` encodes the source once, then runs the decoder one token per step inside one jitted
`lax.while_loop` (static shapes; it stops early once every row, or every beam, has emitted EOS).
T5 conventions: the decoder starts from `decoder_start_id` (the pad id 0), the encoder mask is
`encoder_tokens != 0` (or given, for an encoder whose input is not tokens, e.g. images), and the
output keeps the EOS and is pad (0) after it. A `prompt` is forced at the start of each row (the
question of visual question answering) and decoding continues after it.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.infer.sampling import next_token

PAD_ID = 0


def decode(model, params, encoder_tokens: np.ndarray, *, max_len: int, eos_id: int,
           decoder_start_id: int = 0, beam_size: int = 1, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, seed: int = 0, vocab_size: int | None = None,
           length_penalty: float = 0.6, encoder_mask: np.ndarray | None = None,
           prompt: np.ndarray | None = None) -> np.ndarray:
    """Decodes int32 [batch, max_len] target tokens for `encoder_tokens` int [batch, length].

    Args:
      model: an encoder-decoder with `encode` and `decode(..., decode=True)` (jaxlm.models.t5,
        jaxlm.models.image_to_text).
      params: its parameters.
      encoder_tokens: the source, padded with 0; or any input of `model.encode` (e.g. images)
        when `encoder_mask` is given.
      max_len: decoder steps; at most `model.max_len`, the size of the KV cache.
      eos_id: ends a row; it is kept in the output and everything after it is pad (0).
      decoder_start_id: the token fed first (T5: the pad id); not part of the output.
      beam_size: 1 decodes greedily (temperature 0) or samples; more runs beam search.
      temperature, top_k, top_p: sampling (see `generate.next_token`); temperature 0 is greedy.
      seed: the sampling seed.
      vocab_size: only the first `vocab_size` logits compete (default: the model's), since a
        vocabulary padded for sharding has ids no tokenizer can decode.
      length_penalty: beam search ranks its final beams by log-probability / ((5 + length) / 6)
        ** length_penalty (GNMT, Wu et al. 2016); the length counts the EOS (and not the prompt).
      encoder_mask: bool [batch, encoder positions] (default: `encoder_tokens != 0`).
      prompt: int [batch, p] tokens each row starts with, padded with 0 (its rows may differ in
        length); they are part of the output and count towards `max_len`.

    Returns:
      int32 [batch, max_len], without the start token.
    """
    vocab_size = vocab_size or model.vocab_size
    if encoder_mask is None:
        encoder_tokens = np.asarray(encoder_tokens, np.int32)
        if encoder_tokens.ndim != 2:
            raise ValueError(f"encoder_tokens must be [batch, length], not {encoder_tokens.shape}")
        encoder_mask = encoder_tokens != PAD_ID
    batch = encoder_mask.shape[0]
    prompt = np.zeros((batch, 0), np.int32) if prompt is None else np.asarray(prompt, np.int32)
    _check_args(model, batch, prompt, max_len, eos_id, beam_size, temperature, vocab_size)
    common = dict(max_len=max_len, eos_id=eos_id, decoder_start_id=decoder_start_id,
                  vocab_size=vocab_size)
    forced = jnp.asarray(np.pad(prompt, ((0, 0), (0, max_len - prompt.shape[1]))))
    inputs = (jnp.asarray(encoder_tokens), jnp.asarray(encoder_mask, bool), forced)
    if beam_size > 1:
        tokens = _beam_search(model, params, *inputs, beam_size=beam_size,
                              length_penalty=float(length_penalty), **common)
    else:
        tokens = _sample(model, params, *inputs, jax.random.key(seed),
                         temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                         **common)
    return np.asarray(tokens)


def _check_args(model, batch, prompt, max_len, eos_id, beam_size, temperature, vocab_size):
    if prompt.ndim != 2 or prompt.shape[0] != batch:
        raise ValueError(f"prompt must be [batch={batch}, length], not {prompt.shape}")
    if prompt.shape[1] >= max_len:
        raise ValueError(f"a prompt of {prompt.shape[1]} tokens leaves nothing to decode in max_len={max_len}")
    if not 1 <= max_len <= model.max_len:
        raise ValueError(f"max_len={max_len} must be in [1, model.max_len={model.max_len}]: the "
                         f"decoder's KV cache holds model.max_len positions")
    if not 0 < vocab_size <= model.vocab_size:
        raise ValueError(f"vocab_size={vocab_size} must be in "
                         f"[1, model.vocab_size={model.vocab_size}]")
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id={eos_id} is not below vocab_size={vocab_size}")
    if beam_size < 1:
        raise ValueError(f"beam_size={beam_size} must be at least 1")
    if beam_size > 1 and temperature > 0:
        raise ValueError(f"beam search (beam_size={beam_size}) does not sample: temperature="
                         f"{temperature} needs beam_size=1")


def _encode(model, params, encoder_inputs, mask, copies: int):
    """The flat encoder output and the encoder mask, each source row repeated `copies` times."""
    batch, length = mask.shape
    encoded = model.apply({"params": params}, encoder_inputs, mask, method=model.encode)
    encoded = jnp.repeat(encoded.reshape(batch, length, -1), copies, axis=0)
    return encoded.reshape(batch * copies * length, -1), jnp.repeat(mask, copies, axis=0)


def _empty_cache(model, encoded, mask):
    """A zero KV cache for the rows of `mask`, shaped by tracing the decoder's init."""
    token = jnp.zeros((mask.shape[0], 1), jnp.int32)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), encoded, mask, token,
                                               method=model.decode, decode=True)["cache"])
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _step(model, params, cache, encoded, mask, token, step, vocab_size: int):
    """Logits [rows, vocab_size] after `token` [rows] at position `step`, and the new cache."""
    positions = jnp.full((token.shape[0], 1), step, jnp.int32)
    logits, mutated = model.apply({"params": params, "cache": cache}, encoded, mask, token[:, None],
                                  positions, method=model.decode, decode=True, mutable=["cache"])
    return logits[:, -1, :vocab_size], mutated["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_len", "temperature", "top_k", "top_p",
                                             "vocab_size"))
def _sample(model, params, encoder_inputs, encoder_mask, forced, rng, *, max_len: int, eos_id: int,
            decoder_start_id: int, temperature: float, top_k: int, top_p: float, vocab_size: int):
    """Greedy (temperature 0) or sampled tokens int32 [batch, max_len]; `forced` [batch, max_len]
    holds each row's prompt (0 after it)."""
    batch = encoder_mask.shape[0]
    encoded, mask = _encode(model, params, encoder_inputs, encoder_mask, 1)

    def body(state):
        step, cache, token, finished, out = state
        logits, cache = _step(model, params, cache, encoded, mask, token, step, vocab_size)
        new = next_token(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)
        new = jnp.where(forced[:, step] > 0, forced[:, step], jnp.where(finished, PAD_ID, new))
        return step + 1, cache, new, finished | (new == eos_id), out.at[:, step].set(new)

    state = (jnp.int32(0), _empty_cache(model, encoded, mask),
             jnp.full((batch,), decoder_start_id, jnp.int32), jnp.zeros((batch,), bool),
             jnp.full((batch, max_len), PAD_ID, jnp.int32))
    return jax.lax.while_loop(lambda s: (s[0] < max_len) & ~jnp.all(s[3]), body, state)[-1]


def _reorder_cache(cache, rows):
    """Moves each beam's keys and values to the row of its new position (`rows` [batch * beam]
    holds each new beam's parent row). They are the fourth axis from the end (scanned layers add
    a leading one); the cache index is the same for every row."""
    def reorder(path, leaf):
        if path[-1].key in ("cached_key", "cached_value"):
            return jnp.take(leaf, rows, axis=leaf.ndim - 4)
        return leaf
    return jax.tree_util.tree_map_with_path(reorder, cache)


@functools.partial(jax.jit, static_argnames=("model", "max_len", "beam_size", "vocab_size"))
def _beam_search(model, params, encoder_inputs, encoder_mask, forced, *, max_len: int, eos_id: int,
                 decoder_start_id: int, beam_size: int, vocab_size: int, length_penalty: float):
    """The best sequence per row, int32 [batch, max_len].

    Two pools per row, as in GNMT and T5X: `beam_size` alive beams (no EOS yet) and the
    `beam_size` best finished sequences by length-penalized score. Each step scores the alive
    beams' continuations by summed log-probability and takes the best 2 * beam_size: those that
    end in EOS enter the finished pool, the best `beam_size` others stay alive. (A search whose
    finished beams kept competing with alive ones on raw log-probability, which shorter
    sequences always win, ended at the first few EOS and returned translations about 15% too
    short.) The search stops when no alive beam can beat the worst finished one: an alive score
    only falls, and its penalty is at most that of the longest length. Unfinished beams of full
    length compete at the end. While a row's prompt lasts (`forced` [batch, max_len], 0 after
    it) its one continuation is the prompt's token, at log-probability 0, and nothing finishes.
    """
    batch = encoder_mask.shape[0]
    encoded, mask = _encode(model, params, encoder_inputs, encoder_mask, beam_size)
    first_row = jnp.arange(batch)[:, None] * beam_size
    prompt_len = jnp.sum(forced > 0, axis=1)
    penalty = lambda length: ((5.0 + length) / 6.0) ** length_penalty  # length counts the EOS
    longest = penalty(max_len - prompt_len)[:, None]
    widest = min(2 * beam_size, beam_size * vocab_size)
    keep = lambda x, index: jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), 1)

    def body(state):
        step, cache, token, alive, alive_out, done, done_out = state
        logits, cache = _step(model, params, cache, encoded, mask, token, step, vocab_size)
        log_probs = jax.nn.log_softmax(logits).reshape(batch, beam_size, vocab_size)
        prompting = forced[:, step] > 0
        prompt_only = jnp.where(jnp.arange(vocab_size) == forced[:, step, None], 0.0, -jnp.inf)
        log_probs = jnp.where(prompting[:, None, None], prompt_only[:, None, :], log_probs)
        candidates = (alive[..., None] + log_probs).reshape(batch, beam_size * vocab_size)
        scores, index = jax.lax.top_k(candidates, widest)
        parent, new = index // vocab_size, (index % vocab_size).astype(jnp.int32)
        ended = (new == eos_id) & ~prompting[:, None]
        sequences = keep(alive_out, parent).at[:, :, step].set(new)
        alive, pick = jax.lax.top_k(jnp.where(ended, -jnp.inf, scores), beam_size)
        cache = _reorder_cache(cache, (first_row + keep(parent, pick)).reshape(-1))
        finished = jnp.where(ended, scores / penalty(step + 1 - prompt_len)[:, None], -jnp.inf)
        done, best = jax.lax.top_k(jnp.concatenate([done, finished], 1), beam_size)
        done_out = keep(jnp.concatenate([done_out, sequences], 1), best)
        return (step + 1, cache, keep(new, pick).reshape(-1), alive, keep(sequences, pick), done,
                done_out)

    def searching(state):
        step, alive, done = state[0], state[3], state[5]
        return (step < max_len) & jnp.any(alive[:, 0] / longest[:, 0] > done[:, -1])

    # The beams start identical, so only the first may grow at step 0 (else all would pick the
    # same best token).
    alive = jnp.broadcast_to(jnp.where(jnp.arange(beam_size) == 0, 0.0, -jnp.inf), (batch, beam_size))
    empty = jnp.full((batch, beam_size, max_len), PAD_ID, jnp.int32)
    state = (jnp.int32(0), _empty_cache(model, encoded, mask),
             jnp.full((batch * beam_size,), decoder_start_id, jnp.int32), alive, empty,
             jnp.full((batch, beam_size), -jnp.inf), empty)
    _, _, _, alive, alive_out, done, done_out = jax.lax.while_loop(searching, body, state)
    # Finished first, so that they win ties; alive beams only compete once they are full length.
    best = jnp.argmax(jnp.concatenate([done, alive / longest], 1), axis=1)
    return keep(jnp.concatenate([done_out, alive_out], 1), best[:, None])[:, 0]
