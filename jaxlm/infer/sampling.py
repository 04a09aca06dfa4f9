"""Sampling from a decoder with a KV cache, in a jitted loop.

Each segment prefills the cache with the context in one call and then decodes token by token
inside `lax.scan`. When the cache is full (the model's `max_len`), the next segment re-prefills
with the last `max_len // 2` tokens, so generation can run past the context length the way
nanoGPT's sampler crops its context.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def next_token(logits, rng, temperature: float, top_k: int, top_p: float):
    """Greedy when temperature is 0; else temperature, then top-k, then top-p filtering."""
    if temperature == 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, -1)[..., ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, -1), -1)
        # keep the smallest set whose mass reaches top_p: tokens before the crossing, and it
        cutoff_index = jnp.sum(cumulative < top_p, -1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, -1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits).astype(jnp.int32)


def empty_cache(model, tokens):
    """A zero KV cache of `model.max_len` positions for the batch of `tokens` (inside jit)."""
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens[:, :1], decode=True)["cache"]))


@functools.partial(jax.jit, static_argnames=("model", "steps", "temperature", "top_k", "top_p",
                                             "vocab_size"))
def _segment(model, params, context, rng, *, steps: int, temperature: float, top_k: int, top_p: float,
             vocab_size: int):
    """Prefills with `context` [b, t] and samples `steps` tokens; returns them [b, steps].

    Only the first `vocab_size` logits compete: a vocabulary padded for sharding
    (`model.vocab_multiple`) has ids no tokenizer can decode.
    """
    batch, length = context.shape
    cache = empty_cache(model, context)
    positions = jnp.broadcast_to(jnp.arange(length), context.shape)
    logits, mutated = model.apply({"params": params, "cache": cache}, context, positions,
                                  decode=True, mutable=["cache"])
    first = next_token(logits[:, -1, :vocab_size], jax.random.fold_in(rng, 0), temperature, top_k, top_p)

    def decode_one(carry, i):
        cache, token = carry
        pos = jnp.full((batch, 1), length + i, jnp.int32)
        logits, mutated = model.apply({"params": params, "cache": cache}, token[:, None], pos,
                                      decode=True, mutable=["cache"])
        new = next_token(logits[:, -1, :vocab_size], jax.random.fold_in(rng, i + 1), temperature, top_k,
                         top_p)
        return (mutated["cache"], new), token

    (_, last), tokens = jax.lax.scan(decode_one, (mutated["cache"], first), jnp.arange(steps - 1))
    return jnp.concatenate([tokens.T, last[:, None]], axis=1)


def generate(model, params, prompt: np.ndarray, max_new_tokens: int, *, seed: int = 0,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             vocab_size: int | None = None) -> np.ndarray:
    """Samples `max_new_tokens` after `prompt` (int [batch, length]); returns the new tokens.

    `vocab_size` (default: the model's) limits sampling to the ids the tokenizer knows.
    """
    prompt = np.asarray(prompt, np.int32)
    max_len = model.max_len
    if prompt.shape[1] < 1:
        raise ValueError("the prompt must have at least one token")
    if max_new_tokens < 1:
        return np.zeros((prompt.shape[0], 0), np.int32)
    context = prompt if prompt.shape[1] < max_len else prompt[:, -(max_len // 2):]
    rng, out, produced = jax.random.key(seed), [], 0
    while produced < max_new_tokens:
        # After the first segment every segment decodes a full window, so one compiled segment
        # serves them all; the last one's surplus tokens are dropped below.
        room = max_len - context.shape[1]
        steps = min(room, max_new_tokens) if produced == 0 else room
        tokens = np.asarray(_segment(model, params, jnp.asarray(context), jax.random.fold_in(rng, produced),
                                     steps=steps, temperature=float(temperature), top_k=int(top_k),
                                     top_p=float(top_p), vocab_size=vocab_size or model.vocab_size))
        out.append(tokens)
        produced += steps
        context = np.concatenate([context, tokens], 1)[:, -(max_len // 2):]
    return np.concatenate(out, 1)[:, :max_new_tokens]


def sample_text(model, params, tokenizer, sample_config, seed: int = 0) -> str:
    """The prompt of `config.sample` followed by its continuation, as text."""
    prompt = np.array([tokenizer.encode(sample_config.prompt)], np.int32)
    new = generate(model, params, prompt, sample_config.max_new_tokens, seed=seed,
                   temperature=sample_config.temperature, top_k=sample_config.top_k,
                   top_p=sample_config.top_p, vocab_size=tokenizer.vocab_size)
    return sample_config.prompt + tokenizer.decode(new[0].tolist())


def left_pad(prompts: list, pad_id: int, limit: int, multiple: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [batch, length], key mask) of `prompts` padded on the left to the longest,
    rounded up to `multiple` (fewer prefill compiles) but not past `limit`: every row's last
    token is the last."""
    longest = max(len(p) for p in prompts)
    length = max(min(-(-longest // multiple) * multiple, limit), longest)
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, -len(prompt):], mask[row, -len(prompt):] = prompt, 1
    return tokens, mask


@functools.partial(jax.jit, static_argnames=("model", "sampler", "vocab_size"))
def _prefill(model, params, tokens, mask, rng, *, sampler: tuple, vocab_size: int):
    """(cache after the left-padded prompts, each row's first new token, the cache's key mask,
    each row's last position). Slots after the prompts count as real: the causal mask hides
    those not written yet."""
    cache = empty_cache(model, tokens)
    key_mask = jnp.ones((tokens.shape[0], model.max_len), jnp.int32).at[:, :tokens.shape[1]].set(mask)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)  # each row counts from its first real token
    logits, mutated = model.apply({"params": params, "cache": cache}, tokens, positions, decode=True,
                                  key_mask=key_mask, mutable=["cache"])
    first = next_token(logits[:, -1, :vocab_size], rng, *sampler)
    return mutated["cache"], first, key_mask, positions[:, -1]


@functools.partial(jax.jit, static_argnames=("model", "steps", "sampler", "vocab_size"))
def _decode(model, params, cache, token, key_mask, position, rng, *, steps: int, sampler: tuple,
            vocab_size: int):
    """Feeds `token` (each row after its `position`) and the tokens it leads to: (cache, the
    `steps` new tokens [batch, steps], the last position fed)."""

    def one(carry, i):
        cache, token, position = carry
        position = position + 1
        logits, mutated = model.apply({"params": params, "cache": cache}, token[:, None], position[:, None],
                                      decode=True, key_mask=key_mask, mutable=["cache"])
        new = next_token(logits[:, -1, :vocab_size], jax.random.fold_in(rng, i), *sampler)
        return (mutated["cache"], new, position), new

    (cache, _, position), tokens = jax.lax.scan(one, (cache, token, position), jnp.arange(steps))
    return cache, tokens.T, position


def stream(model, params, prompts: list, max_new_tokens: int, *, stop_ids=(), pad_id: int = 0,
           seed: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           vocab_size: int | None = None, chunk: int = 8):
    """Yields the new tokens of a batch of prompts (lists of ids, any lengths) as they come:
    [batch, n] arrays of at most `chunk` columns, -1 from a row's first stop id on. Ends when
    every row has stopped, after `max_new_tokens`, or when the KV cache (`model.max_len`) is
    full.

    Prompts are left-padded into one batch; padding is masked out of attention and each row's
    positions count from its own first token, so a row decodes as it would alone.
    """
    tokens, mask = left_pad(prompts, pad_id, limit=model.max_len - 1)
    room = model.max_len - tokens.shape[1]
    if room < 1:
        raise ValueError(f"the prompts ({tokens.shape[1]} tokens padded) leave no room in the "
                         f"model's {model.max_len}-token cache")
    sampler = (float(temperature), int(top_k), float(top_p))
    vocab_size, rng = vocab_size or model.vocab_size, jax.random.key(seed)
    cache, token, key_mask, position = _prefill(model, params, jnp.asarray(tokens), jnp.asarray(mask),
                                                jax.random.fold_in(rng, 0), sampler=sampler,
                                                vocab_size=vocab_size)
    stopped, stops = np.zeros(len(prompts), bool), np.asarray(list(stop_ids), np.int64)
    new, produced, limit = np.asarray(token)[:, None], 1, min(max_new_tokens, room)
    while True:
        out = np.where(stopped[:, None], -1, new)
        hit = np.isin(new, stops) & ~stopped[:, None]
        for row in np.nonzero(hit.any(1))[0]:
            out[row, np.argmax(hit[row]):] = -1
        stopped |= hit.any(1)
        yield out
        if stopped.all() or produced >= limit:
            return
        steps = min(chunk, limit - produced)
        cache, new, position = _decode(model, params, cache, jnp.asarray(new[:, -1]), key_mask, position,
                                       jax.random.fold_in(rng, produced), steps=steps, sampler=sampler,
                                       vocab_size=vocab_size)
        new, produced = np.asarray(new), produced + steps
