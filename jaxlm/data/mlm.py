"""BERT pretraining data: masked-LM and next-sentence-prediction examples on Grain.

Public functions:

  documents_from_text(text) -> list[list[str]]
  encode_documents(documents, tokenizer) -> list[list[np.ndarray]]
  specials_for(tokenizer) -> (Specials, extra_ids)
  mask_tokens(ids, can_mask, rng, *, vocab_size, mask_id, probability=0.15,
              word_starts=None) -> (inputs, targets, weights)
  mlm_nsp_dataset(documents, *, seq_len, global_batch_size, seed, specials,
                  vocab_size, probability=0.15, whole_word=False,
                  word_starts_fn=None, nsp=True, process_index=0,
                  process_count=1) -> grain.MapDataset
  mlm_nsp_train_iterator(documents, *, num_threads=2, prefetch_buffer_size=8,
                         **mlm_nsp_dataset_kwargs) -> grain.DatasetIterator
  mlm_nsp_eval_batches(documents, ..., max_batches=0, ...) -> list[dict]

Text follows BERT's create_pretraining_data format: documents are separated by
blank lines, each non-empty line is a sentence (in Tiny Shakespeare a speech is
a document and its lines, the speaker's name included, are its sentences).

Examples anchor where BERT's chunks start: each document is walked sentence
by sentence and a chunk ends at the first sentence that brings it to
seq_len - 3 tokens (seq_len - 2 without NSP) or at the end of the document.
So an epoch is one pass over the text, examples are full except the last of a
document, and a document shorter than that (a Tiny Shakespeare speech) is one
example. The random choices of example i (target length, split point, NSP
pair, masks) are drawn from `np.random.default_rng([seed, epoch, i])`: every
epoch draws new pairs and new masks (dynamic masking), yet any batch can be
rebuilt from the iterator state alone. As in BERT, the chunk from the anchor
(up to seq_len - 3 tokens, or with probability 0.1 a random shorter target) is
split at a random sentence: segment A is the part before; segment B is the
part after (the actual next sentences, NSP label 0 as in Hugging Face) or,
half of the time, sentences from a random other document (label 1; the rest
of the chunk is then unused this epoch, where BERT would start its next chunk
there). A one-sentence chunk takes the next sentence (or the previous one at
the end of the document) as B; only one-sentence documents never give a
label-0 pair. The longer segment is then cut, token by token from a random
end, until [CLS] A [SEP] B [SEP] fits in seq_len. Without NSP an example is
the chunk alone: [CLS] A [SEP].

A batch is a dict of numpy arrays with b = global_batch_size // process_count
rows: `input_ids`, `segment_ids` (0 for [CLS] A [SEP], 1 for B [SEP], 0 on
padding), `input_mask` (1 on real tokens), `mlm_targets` (the original id where
a token was chosen for prediction, else 0) int32[b, seq_len], `mlm_weights`
float32[b, seq_len] (1.0 where chosen) and `nsp_label` int32[b]. Special tokens
and padding are never chosen. Process p of P gets rows p*b..(p+1)*b of every
global batch (see `batching`), so the global batches do not depend on the process count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data import batching, tokenizers

SHORT_SEQ_PROB = 0.1  # BERT: this often, aim for a random shorter length (as in fine-tuning).
MASK_FRACTION = 0.8  # Of the chosen tokens: 80% become [MASK],
RANDOM_FRACTION = 0.1  # 10% a random token, the rest stay as they are.

WordStartsFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Specials:
    """The ids of BERT's special tokens."""

    cls: int
    sep: int
    mask: int
    pad: int


def documents_from_text(text: str) -> list[list[str]]:
    """Splits `text` into documents (blank-line separated) of sentences (stripped lines)."""
    documents: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            documents.append(current)
            current = []
    if current:
        documents.append(current)
    return documents


def encode_documents(
    documents: Sequence[Sequence[str]], tokenizer: tokenizers.Tokenizer
) -> list[list[np.ndarray]]:
    """Tokenizes every sentence; sentences without tokens and then empty documents are dropped."""
    encoded = []
    for document in documents:
        sentences = [np.asarray(tokenizer.encode(s), dtype=np.int32) for s in document]
        sentences = [ids for ids in sentences if ids.size]
        if sentences:
            encoded.append(sentences)
    return encoded


def specials_for(tokenizer: tokenizers.Tokenizer) -> tuple[Specials, int]:
    """The tokenizer's own [CLS], [SEP], [MASK] and [PAD] ids, new ids for those it lacks.

    Returns:
      (specials, extra_ids): missing specials get the ids vocab_size, vocab_size + 1, ...;
      extra_ids is how many were added (the model's vocabulary is vocab_size + extra_ids).
    """
    next_id = tokenizer.vocab_size
    ids = {}
    for name in ("cls", "sep", "mask", "pad"):
        own = getattr(tokenizer, f"{name}_id")
        if own is None:
            own = next_id
            next_id += 1
        ids[name] = own
    return Specials(**ids), next_id - tokenizer.vocab_size


def _word_spans(can_mask: np.ndarray, word_starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(first position, length) of each word among the maskable positions.

    A word is a start token plus the maskable non-start tokens after it; a maskable token after
    a non-maskable one (e.g. a '##' piece right after [SEP], left by truncation) starts a word.
    """
    after_unmaskable = np.concatenate([[True], ~can_mask[:-1]])
    starts = can_mask & (np.asarray(word_starts, dtype=bool) | after_unmaskable)
    first = np.flatnonzero(starts)
    lengths = np.bincount(np.cumsum(starts)[can_mask] - 1, minlength=len(first))
    return first, lengths


def _choose_whole_words(
    can_mask: np.ndarray, word_starts: np.ndarray, budget: int, rng: np.random.Generator
) -> np.ndarray:
    """Positions of whole words in random order, skipping words that overflow the budget (BERT).

    The first word drawn is always taken, so something is chosen even when every word is
    longer than the budget.
    """
    first, lengths = _word_spans(can_mask, word_starts)
    chosen = []
    count = 0
    for word in rng.permutation(len(first)):
        if count and count + lengths[word] > budget:
            continue
        chosen.append(np.arange(first[word], first[word] + lengths[word]))
        count += lengths[word]
        if count >= budget:
            break
    return np.concatenate(chosen) if chosen else np.zeros([0], np.int64)


def mask_tokens(
    ids: np.ndarray,
    can_mask: np.ndarray,
    rng: np.random.Generator,
    *,
    vocab_size: int,
    mask_id: int,
    probability: float = 0.15,
    word_starts: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT's masking of one sequence.

    Chooses round(probability * n) of the n positions where `can_mask` (at least one when
    n > 0); with `word_starts`, whole words instead (see `_choose_whole_words`). Of the chosen
    tokens 80% become `mask_id`, 10% a random id in [0, vocab_size) and 10% stay.

    Args:
      ids: int[L] token ids.
      can_mask: bool[L], False on special tokens and padding.
      rng: the random generator.
      vocab_size: random replacements are drawn from [0, vocab_size).
      mask_id: the [MASK] id.
      probability: the fraction of maskable tokens to predict.
      word_starts: bool[L], True where a token starts a word: whole-word masking.

    Returns:
      (inputs int32[L], targets int32[L]: original id where chosen else 0,
      weights float32[L]: 1.0 where chosen else 0).
    """
    ids = np.asarray(ids)
    can_mask = np.asarray(can_mask, dtype=bool)
    candidates = np.flatnonzero(can_mask)
    budget = max(1, round(probability * len(candidates))) if len(candidates) else 0
    if word_starts is None:
        chosen = rng.choice(candidates, budget, replace=False)
    else:
        chosen = _choose_whole_words(can_mask, word_starts, budget, rng)
    inputs = ids.astype(np.int32)
    targets = np.zeros(ids.shape, np.int32)
    weights = np.zeros(ids.shape, np.float32)
    targets[chosen] = ids[chosen]
    weights[chosen] = 1.0
    action = rng.random(len(chosen))
    inputs[chosen[action < MASK_FRACTION]] = mask_id
    replace = chosen[(action >= MASK_FRACTION) & (action < MASK_FRACTION + RANDOM_FRACTION)]
    inputs[replace] = rng.integers(vocab_size, size=len(replace))
    return inputs, targets, weights


def _cuts(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
    """How many tokens BERT's truncate_seq_pair removes from A and B (always from the longer)."""
    excess = len_a + len_b - max_tokens
    if excess <= 0:
        return 0, 0
    cut_a = min(excess, len_a - len_b) if len_a > len_b else 0
    cut_b = min(excess, len_b - len_a) if len_b >= len_a else 0
    rest = excess - cut_a - cut_b  # Once equal, the loop alternates, B first.
    return cut_a + rest // 2, cut_b + rest - rest // 2


def _trim(span: tuple[int, int], cut: int, rng: np.random.Generator) -> tuple[int, int]:
    # BERT removes each token from the front or the back with probability 1/2.
    front = int(rng.binomial(cut, 0.5)) if cut else 0
    return span[0] + front, span[1] - (cut - front)


@dataclasses.dataclass(frozen=True)
class _Corpus:
    """All sentences in one token array: sentence s is tokens[starts[s]:starts[s + 1]]."""

    tokens: np.ndarray
    starts: np.ndarray  # [sentences + 1] token offsets.
    doc_starts: np.ndarray  # [documents + 1] sentence offsets.
    doc_of: np.ndarray  # [sentences] the document of each sentence.
    word_starts: np.ndarray | None

    @classmethod
    def build(
        cls, documents: Sequence[Sequence[np.ndarray]], word_starts_fn: WordStartsFn | None
    ) -> _Corpus:
        documents = [[np.asarray(s, dtype=np.int32) for s in doc if len(s)] for doc in documents]
        documents = [doc for doc in documents if doc]
        if not documents:
            raise ValueError("The MLM data has no documents with tokens.")
        sentences = [sentence for doc in documents for sentence in doc]
        sizes = [len(doc) for doc in documents]
        tokens = np.concatenate(sentences)
        starts = np.concatenate([[0], np.cumsum([len(s) for s in sentences])])
        word_starts = None if word_starts_fn is None else np.asarray(word_starts_fn(tokens), bool)
        return cls(
            tokens=tokens,
            starts=starts,
            doc_starts=np.concatenate([[0], np.cumsum(sizes)]),
            doc_of=np.repeat(np.arange(len(sizes)), sizes),
            word_starts=word_starts,
        )

    @property
    def num_documents(self) -> int:
        return len(self.doc_starts) - 1

    def chunk_end(self, first: int, limit: int, target: int) -> int:
        """End (exclusive) of the sentences from `first` that first reach `target` tokens,
        at most `limit`."""
        end = int(np.searchsorted(self.starts, self.starts[first] + target, side="left"))
        return min(max(end, first + 1), limit)

    def chunk_starts(self, target: int) -> np.ndarray:
        """The first sentences of BERT's chunks of `target` tokens, document by document."""
        starts = []
        for doc in range(self.num_documents):
            sentence, end = int(self.doc_starts[doc]), int(self.doc_starts[doc + 1])
            while sentence < end:
                starts.append(sentence)
                sentence = self.chunk_end(sentence, end, target)
        return np.asarray(starts, dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class _ExampleMaker:
    """Builds example i of an epoch from the chunk at anchors[i] (see the module docstring)."""

    corpus: _Corpus
    anchors: np.ndarray  # The sentence each example starts at.
    seq_len: int
    seed: int
    specials: Specials
    vocab_size: int
    probability: float
    whole_word: bool
    nsp: bool

    @property
    def num_examples(self) -> int:
        return len(self.anchors)

    def example(self, epoch: int, example: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch, example])
        sentence = int(self.anchors[example])
        max_tokens = self.seq_len - (3 if self.nsp else 2)
        target = max_tokens
        if rng.random() < SHORT_SEQ_PROB:
            target = int(rng.integers(2, max_tokens + 1))
        if self.nsp:
            span_a, span_b, label = self._pair(sentence, target, rng)
        else:
            doc = self.corpus.doc_of[sentence]
            end = self.corpus.chunk_end(sentence, self.corpus.doc_starts[doc + 1], target)
            span_a, span_b, label = self._span(sentence, end), None, 0
        len_b = 0 if span_b is None else span_b[1] - span_b[0]
        cut_a, cut_b = _cuts(span_a[1] - span_a[0], len_b, max_tokens)
        span_a = _trim(span_a, cut_a, rng)
        if span_b is not None:
            span_b = _trim(span_b, cut_b, rng)
        return self._assemble(span_a, span_b, label, rng)

    def _span(self, first: int, end: int) -> tuple[int, int]:
        """The token span of sentences first..end-1."""
        return int(self.corpus.starts[first]), int(self.corpus.starts[end])

    def _pair(
        self, sentence: int, target: int, rng: np.random.Generator
    ) -> tuple[tuple[int, int], tuple[int, int], int]:
        """Segments A and B (token spans) and the NSP label (0: B follows A, 1: random)."""
        corpus = self.corpus
        doc = corpus.doc_of[sentence]
        doc_first, doc_end = int(corpus.doc_starts[doc]), int(corpus.doc_starts[doc + 1])
        first, end = sentence, corpus.chunk_end(sentence, doc_end, target)
        is_next = rng.random() < 0.5 and doc_end - doc_first > 1
        if is_next and end - first == 1:  # B needs a sentence: the next, else A the previous.
            if end < doc_end:
                end += 1
            else:
                first -= 1
        split = first + (int(rng.integers(1, end - first)) if end - first > 1 else 1)
        span_a = self._span(first, split)
        if is_next:
            return span_a, self._span(split, end), 0
        other = int(rng.integers(corpus.num_documents - 1))
        other += other >= doc
        other_first = int(rng.integers(corpus.doc_starts[other], corpus.doc_starts[other + 1]))
        target_b = max(1, target - (span_a[1] - span_a[0]))
        other_end = corpus.chunk_end(other_first, int(corpus.doc_starts[other + 1]), target_b)
        return span_a, self._span(other_first, other_end), 1

    def _assemble(
        self,
        span_a: tuple[int, int],
        span_b: tuple[int, int] | None,
        label: int,
        rng: np.random.Generator,
    ) -> dict[str, np.ndarray]:
        """[CLS] A [SEP] (B [SEP]) padded to seq_len, masked."""
        specials, corpus = self.specials, self.corpus
        ids = np.full(self.seq_len, specials.pad, np.int32)
        segment_ids = np.zeros(self.seq_len, np.int32)
        can_mask = np.zeros(self.seq_len, bool)
        word_starts = np.zeros(self.seq_len, bool)
        ids[0] = specials.cls
        position = 1
        for segment, span in enumerate([span_a] if span_b is None else [span_a, span_b]):
            n = span[1] - span[0]
            ids[position : position + n] = corpus.tokens[span[0] : span[1]]
            can_mask[position : position + n] = True
            if corpus.word_starts is not None:
                word_starts[position : position + n] = corpus.word_starts[span[0] : span[1]]
            ids[position + n] = specials.sep
            segment_ids[position : position + n + 1] = segment
            position += n + 1
        inputs, targets, weights = mask_tokens(
            ids,
            can_mask,
            rng,
            vocab_size=self.vocab_size,
            mask_id=specials.mask,
            probability=self.probability,
            word_starts=word_starts if self.whole_word else None,
        )
        return {
            "input_ids": inputs,
            "segment_ids": segment_ids,
            "input_mask": (np.arange(self.seq_len) < position).astype(np.int32),
            "mlm_targets": targets,
            "mlm_weights": weights,
            "nsp_label": np.int32(label),
        }


def _example_maker(
    documents: Sequence[Sequence[np.ndarray]],
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    specials: Specials,
    vocab_size: int,
    probability: float,
    whole_word: bool,
    word_starts_fn: WordStartsFn | None,
    nsp: bool,
    what: str,
) -> _ExampleMaker:
    """Checks the arguments and indexes the corpus (`what` names it in errors)."""
    shortest = 5 if nsp else 4  # Room for the specials and 2 tokens of text.
    if seq_len < shortest:
        raise ValueError(f"seq_len must be at least {shortest} (nsp={nsp}); got {seq_len}.")
    if not 0 < probability <= 1:
        raise ValueError(f"The masking probability must be in (0, 1]; got {probability}.")
    if whole_word and word_starts_fn is None:
        raise ValueError("whole_word=True needs word_starts_fn (e.g. tokenizer.word_starts).")
    corpus = _Corpus.build(documents, word_starts_fn if whole_word else None)
    if nsp and corpus.num_documents < 2:
        raise ValueError(
            "Next-sentence prediction draws random B segments from other documents and needs at"
            f" least 2 documents; {what} has {corpus.num_documents} (blank lines separate"
            " documents)."
        )
    anchors = corpus.chunk_starts(seq_len - (3 if nsp else 2))
    if len(anchors) < global_batch_size:
        raise ValueError(
            f"{what} makes {len(anchors)} examples of seq_len {seq_len} (chunks of"
            f" {corpus.num_documents} documents), fewer than one global batch of"
            f" {global_batch_size}; lower global_batch_size or use more data."
        )
    return _ExampleMaker(
        corpus=corpus,
        anchors=anchors,
        seq_len=seq_len,
        seed=seed,
        specials=specials,
        vocab_size=vocab_size,
        probability=probability,
        whole_word=whole_word,
        nsp=nsp,
    )


def mlm_nsp_dataset(
    documents: Sequence[Sequence[np.ndarray]],
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    specials: Specials,
    vocab_size: int,
    probability: float = 0.15,
    whole_word: bool = False,
    word_starts_fn: WordStartsFn | None = None,
    nsp: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    what: str = "The MLM data",
) -> grain.MapDataset:
    """Shuffled, repeated, batched MLM(+NSP) examples for one process (an infinite MapDataset).

    Args:
      documents: tokenized documents (see `encode_documents`).
      seq_len: tokens per example, specials and padding included.
      global_batch_size: rows per step over all processes.
      seed: shuffle, pairing and masking seed.
      specials: see `specials_for`.
      vocab_size: random replacement tokens are drawn from [0, vocab_size) (the tokenizer's
        vocabulary, so that appended special ids are never drawn).
      probability: the fraction of tokens to predict.
      whole_word: mask whole words (needs `word_starts_fn`).
      word_starts_fn: ids -> bool array, True where a token starts a word
        (`tokenizer.word_starts`).
      nsp: build sentence pairs with next-sentence labels; else single segments.
      process_index: this process.
      process_count: number of processes.
      what: the documents in errors, e.g. "Split 'validation' of jaxlm_text_files".

    Returns:
      A MapDataset of batches (see the module docstring) of b = global_batch_size //
      process_count rows.
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    maker = _example_maker(
        documents,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        specials=specials,
        vocab_size=vocab_size,
        probability=probability,
        whole_word=whole_word,
        word_starts_fn=word_starts_fn,
        nsp=nsp,
        what=what,
    )
    return batching.per_process_batches(
        batching.shuffled_epochs(maker.num_examples, seed, maker.example),
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def mlm_nsp_train_iterator(
    documents: Sequence[Sequence[np.ndarray]],
    *,
    num_threads: int = 2,
    prefetch_buffer_size: int = 8,
    **dataset_kwargs: Any,
) -> grain.DatasetIterator:
    """An endless, checkpointable iterator over `mlm_nsp_dataset(documents, **dataset_kwargs)`
    (see `batching.iterate`)."""
    return batching.iterate(
        mlm_nsp_dataset(documents, **dataset_kwargs), num_threads, prefetch_buffer_size
    )


def mlm_nsp_eval_batches(
    documents: Sequence[Sequence[np.ndarray]],
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    specials: Specials,
    vocab_size: int,
    max_batches: int = 0,
    probability: float = 0.15,
    whole_word: bool = False,
    word_starts_fn: WordStartsFn | None = None,
    nsp: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    what: str = "The MLM data",
) -> list[dict[str, Any]]:
    """The first `max_batches` (<= 0: all) evaluation batches of this process.

    The same batches every call: the examples of epoch 0 in one fixed order drawn from `seed`,
    so that a few batches sample the whole split rather than its first documents; the
    examples that do not fill a last global batch are dropped. Arguments as in
    `mlm_nsp_dataset`.
    """
    batching.per_process_batch_size(global_batch_size, process_index, process_count)
    maker = _example_maker(
        documents,
        seq_len=seq_len,
        global_batch_size=global_batch_size,
        seed=seed,
        specials=specials,
        vocab_size=vocab_size,
        probability=probability,
        whole_word=whole_word,
        word_starts_fn=word_starts_fn,
        nsp=nsp,
        what=what,
    )
    order = np.random.default_rng(seed).permutation(maker.num_examples)
    return batching.eval_batches(
        maker.num_examples,
        lambda rows: batching.stack([maker.example(0, int(order[row])) for row in rows]),
        global_batch_size=global_batch_size,
        max_batches=max_batches,
        process_index=process_index,
        process_count=process_count,
    )
