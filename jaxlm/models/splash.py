"""Pallas splash attention: the TPU kernel that takes the mask as structure (causal, a sliding
window, segment ids of packed examples) instead of an additive bias, so it never materialises
the [q_len, k_len] scores and skips the blocks the mask hides.

On other backends the same kernel runs interpreted (slow, exact), which is how the tests check
it on CPU. Under a mesh it runs per shard (`jax.shard_map`): batch over the data axes, query and
key/value heads over `tensor`, as the logical-axis rules place them.
"""

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

TILE = 128  # splash's blocks are multiples of 128 positions
BLOCKS = (512, 256, 128)


def unsupported(q_len: int, k_len: int, has_bias: bool) -> str:
    """Why splash cannot run this self-attention call ('' when it can)."""
    if has_bias:
        return "it takes no additive bias (T5's relative positions, padding masks): only causal, sliding-window and segment-id masks"
    if q_len != k_len:
        return f"queries ({q_len}) and keys ({k_len}) differ in length"
    if q_len % TILE:
        return f"the length {q_len} is not a multiple of {TILE}"
    return ""


def _mask(length: int, causal: bool, window: int):
    """One head's mask, as `layers.causal_bias` draws it: causal, the query at p sees keys up to
    p, or with a sliding `window` keys p - window + 1..p; bidirectional sees every key."""
    shape = (length, length)
    if not causal:
        return mask_lib.FullMask(shape)
    if window:
        return mask_lib.LocalMask(shape, window_size=(window - 1, 0), offset=0)
    return mask_lib.CausalMask(shape)


def _kernel(length: int, group: int, causal: bool, window: int, softcap: float):
    """The multi-query kernel for one key/value head and its `group` query heads."""
    block = next(b for b in BLOCKS if length % b == 0)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                                  block_q_dq=block, block_kv_dq=block)
    heads = mask_lib.MultiHeadMask([_mask(length, causal, window)] * group)
    return kernel_lib.make_splash_mqa(heads, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                      attn_logits_soft_cap=softcap or None,
                                      interpret=jax.default_backend() != "tpu")


def _local_attention(q, k, v, segment_ids, causal: bool, window: int, softcap: float):
    """q [batch, length, heads, head_dim] (pre-scaled), k, v [batch, length, kv_heads, head_dim]
    of one shard; segment_ids [batch, length] or None."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    kernel = _kernel(length, heads // kv_heads, causal, window, softcap)
    # Query head i belongs to key/value head i // group (as layers.repeat_kv_heads repeats them).
    q = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim).transpose(0, 2, 3, 1, 4)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k, v))

    def example(q, k, v, ids):
        segments = None if ids is None else kernel_lib.SegmentIds(q=ids, kv=ids)
        return jax.vmap(lambda qh, kh, vh: kernel(qh, kh, vh, segment_ids=segments))(q, k, v)

    ids_axis = None if segment_ids is None else 0
    out = jax.vmap(example, in_axes=(0, 0, 0, ids_axis))(q, k, v, segment_ids)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def attention(q, k, v, *, causal: bool, window: int = 0, segment_ids=None, softcap: float = 0.0):
    """softmax(q k^T) v under the causal / sliding-`window` / `segment_ids` mask, by splash
    (with `softcap`, the logits are capped first: cap * tanh(logits / cap)).

    q [batch, length, heads, head_dim] comes pre-scaled; k, v [batch, length, kv_heads, head_dim]
    (grouped-query when kv_heads < heads); segment_ids [batch, length]: a query sees only keys of
    its own segment."""
    def local(q, k, v, ids):
        return _local_attention(q, k, v, ids, causal, window, softcap)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    spec = lambda *axes: nn.logical_to_mesh_axes(axes)
    q_spec, kv_spec = spec("batch", None, "heads", None), spec("batch", None, "kv_heads", None)
    ids_spec = None if segment_ids is None else spec("batch", None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, ids_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)
