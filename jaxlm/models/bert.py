"""BERT: a post-norm Transformer encoder with token, position and segment embeddings.

Fine-tuning tasks give `heads` (see `heads.py`) instead. With `pretraining_heads` it returns the masked-LM logits (a transform, then the input
embedding table as the decoder, plus a bias) and the next-sentence logits on the pooled [CLS].
With `case_vocab_size` it adds a learned embedding of each piece's `case_ids` (the word's
capitalisation, which an uncased vocabulary loses), zero at the start so that a pretrained model
computes what it did.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import heads as heads_lib
from jaxlm.models.layers import (ACTIVATIONS, BlockConfig, Dropout, Embed, block_config, constrain, dense, learned_positions,
                                 mean_pool, norm, padding_bias)
from jaxlm.models.transformer import Context, Stack, StackConfig, stack_config


CASE_EMBEDDING = "case_embedding"
# What 'pooled' is: the pooler (dense + tanh) on [CLS], BERT's; or the mean of the last hidden
# states over the real tokens, the sentence embedding of a sentence-transformers checkpoint,
# whose [CLS] and pooler that training never used.
POOLS = ("cls", "mean")


class BERT(nn.Module):
    vocab_size: int
    max_len: int
    num_layers: int
    cfg: BlockConfig
    type_vocab_size: int = 2
    pretraining_heads: bool = False
    heads: tuple = ()  # (name, source, outputs) task heads
    case_vocab_size: int = 0  # > 0: `case_ids` embeddings (labeled.word_shape classes)
    pool: str = "cls"  # see POOLS
    stack: StackConfig = StackConfig()

    @nn.compact
    def __call__(self, input_ids, segment_ids=None, input_mask=None, mlm_positions=None,
                 deterministic: bool = True, case_ids=None):
        """Returns {'hidden': [b, l, e], 'pooled': [b, e]} (+ 'mlm_logits' [b, p, vocab] at
        `mlm_positions` [b, p], 'nsp_logits' [b, 2] with the pretraining heads)."""
        cfg = self.cfg
        batch, length = input_ids.shape
        segment_ids = jnp.zeros_like(input_ids) if segment_ids is None else segment_ids
        input_mask = jnp.ones_like(input_ids) if input_mask is None else input_mask
        positions = jnp.broadcast_to(jnp.arange(length), input_ids.shape)
        embed = Embed(self.vocab_size, cfg, name="embed")
        x = (embed(input_ids)
             + jnp.take(learned_positions(self, self.max_len, cfg), positions, axis=0)
             + jnp.take(learned_positions(self, self.type_vocab_size, cfg, "type_embedding"),
                        segment_ids, axis=0))
        if self.case_vocab_size:
            table = self.param(CASE_EMBEDDING, nn.with_logical_partitioning(nn.initializers.zeros, (None, "embed")),
                               (self.case_vocab_size, cfg.emb_dim), cfg.param_dtype)
            x = x + jnp.take(table, case_ids, axis=0)
        x = norm(cfg, "embed_norm")(constrain(x.reshape(batch * length, cfg.emb_dim))).astype(cfg.dtype)
        x = Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = Stack(self.num_layers, self.stack, block_kwargs=dict(cfg=cfg, causal=False),
                  name="encoder")(x, Context(positions, bias=padding_bias(input_mask)), deterministic)
        hidden = x.reshape(batch, length, cfg.emb_dim)
        if self.pool == "cls":
            pooled = jnp.tanh(dense(cfg.emb_dim, ("embed", "mlp"), cfg, "pooler", use_bias=True)(hidden[:, 0]))
        elif self.pool == "mean":
            pooled = mean_pool(hidden, input_mask).astype(cfg.dtype)
        else:
            raise ValueError(f"model.pool={self.pool!r}: expected one of {list(POOLS)} for bert")
        out = heads_lib.apply({"hidden": hidden, "pooled": pooled}, self.heads, cfg, deterministic)
        if self.pretraining_heads:
            out["nsp_logits"] = dense(2, ("embed", None), cfg, "nsp", use_bias=True)(pooled).astype(jnp.float32)
            if mlm_positions is not None:
                out["mlm_logits"] = self._mlm_logits(embed, hidden, mlm_positions)
        return out

    def _mlm_logits(self, embed, hidden, positions):
        cfg = self.cfg
        h = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [b, p, e]
        activation = ACTIVATIONS[cfg.mlp][0]  # BERT's hidden_act, as in its MLP
        h = activation(dense(cfg.emb_dim, ("embed", "mlp"), cfg, "mlm_transform", use_bias=True)(h))
        h = norm(cfg, "mlm_norm")(h).astype(cfg.dtype)
        bias = self.param("mlm_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (self.vocab_size,), cfg.param_dtype)
        return (embed.attend(h) + bias).astype(jnp.float32)


def from_config(m, pipeline=None, heads=None, case_vocab_size: int = 0) -> BERT:
    """BERT with the pretraining heads (MLM, NSP), or with the task `heads` when given."""
    if m.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the trainer takes it from the tokenizer)")
    return BERT(vocab_size=m.vocab_size, max_len=m.max_len, num_layers=m.num_layers,
                cfg=block_config(m, post_norm=True), type_vocab_size=m.type_vocab_size,
                pretraining_heads=heads is None, heads=tuple(heads or ()), case_vocab_size=case_vocab_size,
                pool=m.pool, stack=stack_config(m, pipeline))
