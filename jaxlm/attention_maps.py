"""Attention maps of a trained model for one text: the softmax weights of every layer and head.

The scores are sown by the interception that attention-map distillation uses
(`compress.distill.with_attention_maps`), so they are what `Attention.attend` computed, masks
and position biases included. `tools/attention_map.py` draws them.
"""

import dataclasses

import flax
import jax
import numpy as np

from jaxlm.compress import distill
from jaxlm.models.transformer import LAYER
from jaxlm.tasks import causal_lm, classification, seq2seq


@dataclasses.dataclass
class AttentionMaps:
    """`maps[kind]`: float32 [layers, heads, queries, keys] for each kind of attention, named
    '<stack>/<attention>' as the model names them ('decoder/attn' for a GPT, 'encoder/attn' for
    a BERT; a T5 has 'encoder/attn', 'decoder/attn' and 'decoder/cross_attn'); `tokens[side]`:
    the pieces along the axes ('source', and for an encoder-decoder 'target': the decoder's input,
    which starts with the decoder start token)."""

    maps: dict[str, np.ndarray]
    tokens: dict[str, list[str]]

    def axes(self, kind: str) -> tuple[list[str], list[str]]:
        """(query pieces, key pieces) of `kind`."""
        if "target" not in self.tokens or not kind.startswith("decoder/"):
            return self.tokens["source"], self.tokens["source"]
        return self.tokens["target"], self.tokens["source" if kind.endswith("cross_attn") else "target"]


def attention_maps(task, params, text: str, target: str | None = None) -> AttentionMaps:
    """The maps of `text` through `task.model` with `params`. A translation task takes `target`
    as the decoder's text (its reference, say), or translates `text` first when it is None."""
    if not text.strip():
        raise ValueError("the text is empty or only whitespace: no attention to show")
    batch, tokens = _inputs(task, params, text, target)
    model = distill.with_attention_maps(task.model)
    _, collections = model.apply({"params": params}, **task.model_inputs(batch),
                                 mutable=[distill.ATTENTION_SCORES])
    found: dict[str, list] = {}
    for path, value in flax.traverse_util.flatten_dict(collections[distill.ATTENTION_SCORES]).items():
        index = [int(m.group(1)) for k in path if (m := LAYER.match(k))]
        kind = "/".join(k for k in path[:-1] if not LAYER.match(k) and k != "layers")
        scores = np.asarray(jax.nn.softmax(value[0], axis=-1))
        if index:  # a Python loop of blocks: one [1, heads, q, k] per layer
            found.setdefault(kind, []).append((index[0], scores[0]))
        else:  # scanned blocks: [layers, 1, heads, q, k] at once
            found.setdefault(kind, []).extend(enumerate(scores[:, 0]))
    maps = {kind: np.stack([s for _, s in sorted(layers, key=lambda p: p[0])]) for kind, layers in found.items()}
    return AttentionMaps(maps, tokens)


def _pieces(tokenizer, ids) -> list[str]:
    """What each token adds to the decoded text (so a piece keeps its leading space); `<id>` for
    a token that adds nothing (EOS, padding)."""
    ids = [int(i) for i in ids]
    texts = [tokenizer.decode(ids[:n]) for n in range(len(ids) + 1)]
    return [texts[n + 1][len(texts[n]):] if texts[n + 1].startswith(texts[n]) and texts[n + 1] != texts[n]
            else tokenizer.decode([ids[n]]) or f"<{ids[n]}>" for n in range(len(ids))]


def _inputs(task, params, text: str, target: str | None):
    """(a batch of one for `task.model_inputs`, the pieces of each side)."""
    tokenizer = task.tokenizer
    if isinstance(task, seq2seq.Seq2Seq):
        if target is None:
            target = task.predict_text(params, text)["translation"]
        batch = task.text_batch(text, target)
        source = batch["encoder_input_tokens"][0]
        decoder = batch["decoder_input_tokens"][0][: int((batch["decoder_loss_weights"][0] > 0).sum())]
        batch = {"encoder_input_tokens": source[None, : int((source > 0).sum())], "decoder_input_tokens": decoder[None]}
        return batch, {"source": _pieces(tokenizer, batch["encoder_input_tokens"][0]),
                       "target": _pieces(tokenizer, decoder)}
    if target is not None:
        raise ValueError(f"--target is for translation tasks; task {task.config.task.name!r} reads one text")
    if isinstance(task, classification.EncoderTask):
        encoded = task.encode(task.text_example(text))
        length = int(encoded["input_mask"].sum())
        batch = {k: encoded[k][None, :length] for k in task.encoder_keys}
        return batch, {"source": _pieces(tokenizer, batch["input_ids"][0])}
    if isinstance(task, causal_lm.CausalLM):
        ids = np.asarray(tokenizer.encode(text), np.int32)[: task.config.model.max_len]
        return {"inputs": ids[None]}, {"source": _pieces(tokenizer, ids)}
    raise ValueError(f"task {task.config.task.name!r}: attention maps are drawn for translation, "
                     "classification/tagging and language-model runs")


def draw(maps: AttentionMaps, kind: str, title: str = ""):
    """A matplotlib figure of `kind`'s maps: one panel per (layer, head), queries down, keys
    across, each labelled with its pieces (needs matplotlib: the `plots` extra)."""
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    if kind not in maps.maps:
        raise ValueError(f"no {kind!r} attention in this model; it has {sorted(maps.maps)}")
    weights = maps.maps[kind]
    layers, heads, queries, keys = weights.shape
    query_pieces, key_pieces = maps.axes(kind)
    size = max(2.2, 0.16 * max(queries, keys))
    figure, axes = plt.subplots(layers, heads, figsize=(size * heads, size * layers), squeeze=False)
    for layer in range(layers):
        for head in range(heads):
            ax = axes[layer, head]
            ax.imshow(weights[layer, head], cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer} head {head}", fontsize=8)
            ax.set_xticks(range(keys), key_pieces, rotation=90, fontsize=6)
            ax.set_yticks(range(queries), query_pieces, fontsize=6)
    figure.suptitle(title or kind)
    figure.tight_layout()
    return figure
