"""Instruction-tuning data: chat conversations -> tokens with an assistant-only loss -> packed rows.

  read_jsonl(path) -> [Conversation]          # {"messages": [...]} or {"prompt", "response"} lines
  encode(conversation, tokenizer) -> (tokens, loss_mask)
  prompt(conversation, tokenizer) -> (prompt tokens, reference text)   # evaluation by generation
  last_question(conversation) -> str
  pack(examples, seq_len, packed=True) -> (rows, stats)
  train_dataset(rows, ...) / eval_batches(rows, ...)

A line of the JSONL is one conversation: `{"messages": [{"role": "system"|"user"|"assistant",
"content": str}, ...]}` or `{"prompt": str, "response": str}` (one user and one assistant turn),
with an optional `"task"` (a name that groups the evaluation's metrics) and an optional `"system"`
with prompt/response. A malformed line is an error naming the file and the line.

Tokens: the conversation is rendered by the tokenizer's chat template (`chat.render`, as
transformers renders it) or, for tokenizers without one, `chat.PLAIN_TEMPLATE` followed by EOS
after every assistant turn. The loss covers the assistant turns only: the text between the
generation prompt that opens a turn and the end of the turn (its end-of-turn marker included),
found by rendering the conversation up to each turn; every other token has weight 0.

Rows: each example becomes a segment of inputs = tokens[:-1], targets = tokens[1:], weights =
loss_mask[1:] (examples longer than seq_len + 1 tokens are cut, and counted). Packing puts several
segments into each row of seq_len (first fit among a few open rows), with `segment_ids` (1, 2, ...
per segment; 0 for padding) and `positions` counting from 0 in every segment, so that attention
never crosses examples (`models.layers.segment_bias`) and a packed example's loss equals its loss
alone. Without packing every example has a row of its own. `stats` gives the share of non-pad
tokens (the packing efficiency).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from jaxlm.data import batching, chat

ROLES = ("system", "user", "assistant")
ROW_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
OPEN_ROWS = 16  # packing: rows still taking examples; more packs tighter and costs more time


@dataclasses.dataclass(frozen=True)
class Conversation:
    messages: tuple[dict, ...]
    task: str = "default"
    where: str = ""  # file and line, for errors


def _line_error(where: str, message: str) -> ValueError:
    return ValueError(f"{where}: {message}")


def _messages(record: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(record, dict):
        raise _line_error(where, f"expected a JSON object, got {type(record).__name__}.")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise _line_error(where, "'messages' must be a non-empty list of {role, content} objects.")
    elif "prompt" in record and "response" in record:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        if "system" in record:
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        raise _line_error(where, f"needs 'messages', or 'prompt' and 'response'; found keys {sorted(record)}.")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise _line_error(where, f"message {i} must be {{'role': one of {ROLES}, 'content': a string}}; "
                                     f"got {m!r}.")
    if not any(m["role"] == "assistant" for m in messages):
        raise _line_error(where, "the conversation has no assistant message to learn from.")
    return tuple(messages)


def read_jsonl(path: str) -> list[Conversation]:
    """The conversations of a JSONL file (blank lines skipped)."""
    conversations = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise _line_error(where, f"not valid JSON ({e.msg}).") from None
            task = record.get("task", "default") if isinstance(record, dict) else "default"
            conversations.append(Conversation(_messages(record, where), str(task), where))
    if not conversations:
        raise ValueError(f"{path} holds no conversations.")
    return conversations


def _template(tokenizer) -> str:
    return tokenizer.chat_template or chat.PLAIN_TEMPLATE


def _render(tokenizer, messages, generation: bool = False) -> str:
    return chat.render(tokenizer, list(messages), add_generation_prompt=generation, template=_template(tokenizer))


def _plain_eos(tokenizer) -> list[int]:
    """EOS after assistant turns of the plain template (a checkpoint's template writes its own)."""
    plain = not tokenizer.chat_template
    return [tokenizer.eos_id] if plain and tokenizer.eos_id is not None else []


def encode(conversation: Conversation, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """(int32 tokens, bool loss mask) of a conversation: the mask is True on the assistant turns.

    Raises:
      ValueError: naming the line, when the template renders a turn differently depending on
        what follows it (the text up to a turn must be a prefix of the whole conversation).
    """
    messages = conversation.messages
    full = _render(tokenizer, messages)
    spans = []  # (start, end) characters of each assistant turn
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:i], generation=True))
        end = len(_render(tokenizer, messages[: i + 1]))
        if not full.startswith(_render(tokenizer, messages[: i + 1])) or end < start:
            raise _line_error(conversation.where, "the chat template renders an assistant turn differently "
                                                  "when more messages follow; cannot find its tokens.")
        spans.append((start, end))
    eos = _plain_eos(tokenizer)
    tokens, mask, cursor = [], [], 0
    for start, end in spans:
        for piece, learn in ((full[cursor:start], False), (full[start:end], True)):
            ids = tokenizer.encode(piece).tolist() if piece else []
            ids += eos if learn else []
            tokens += ids
            mask += [learn] * len(ids)
        cursor = end
    rest = tokenizer.encode(full[cursor:]).tolist() if full[cursor:] else []
    return np.asarray(tokens + rest, np.int32), np.asarray(mask + [False] * len(rest), bool)


def _last_answer(conversation: Conversation) -> int:
    return max(i for i, m in enumerate(conversation.messages) if m["role"] == "assistant")


def prompt(conversation: Conversation, tokenizer) -> tuple[np.ndarray, str]:
    """(the tokens that ask for the last assistant turn, that turn's text: the reference)."""
    messages, last = conversation.messages, _last_answer(conversation)
    ids = tokenizer.encode(_render(tokenizer, messages[:last], generation=True))
    return np.asarray(ids, np.int32), messages[last]["content"]


def last_question(conversation: Conversation) -> str:
    """The user message the last assistant turn answers ('' when none precedes it)."""
    earlier = [m for m in conversation.messages[: _last_answer(conversation)] if m["role"] == "user"]
    return earlier[-1]["content"] if earlier else ""


def turn_end(tokenizer) -> str:
    """The text a checkpoint's template writes after an assistant reply (e.g. '<|im_end|>'), where
    generation ends when the tokenizer's stop ids do not cover it; '' for the plain template
    (its EOS id stops generation)."""
    if not tokenizer.chat_template:
        return ""
    marker = "\x00reply\x00"
    messages = ({"role": "user", "content": "question"}, {"role": "assistant", "content": marker})
    start = len(_render(tokenizer, messages[:1], generation=True))
    turn = _render(tokenizer, messages)[start:]
    return turn[turn.index(marker) + len(marker):].strip() if marker in turn else ""


def _segment(tokens: np.ndarray, mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    n = min(len(tokens), seq_len + 1) - 1
    return {"inputs": tokens[:n], "targets": tokens[1 : n + 1], "weights": mask[1 : n + 1].astype(np.float32),
            "positions": np.arange(n, dtype=np.int32)}


def pack(examples: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int,
         packed: bool = True) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Rows [n, seq_len] of `ROW_KEYS` from (tokens, mask) examples, in order (see the module
    docstring), and stats: examples, rows, `efficiency` (share of non-pad tokens), `truncated`
    (examples cut to seq_len + 1 tokens), `dropped` (examples of fewer than 2 tokens, or whose
    learned tokens all fell past the cut)."""
    segments, truncated, dropped = [], 0, 0
    for tokens, mask in examples:
        segment = _segment(tokens, mask, seq_len)
        truncated += len(tokens) > seq_len + 1
        if not len(segment["inputs"]) or not segment["weights"].any():
            dropped += 1
            continue
        segments.append(segment)
    if not segments:
        raise ValueError(f"no example has a learned token within seq_len={seq_len} (of {len(examples)} examples)")
    rows: list[list[dict]] = []
    open_rows: list[tuple[int, int]] = []  # (row index, tokens used)
    for segment in segments:
        n = len(segment["inputs"])
        slot = next((k for k, (_, used) in enumerate(open_rows) if used + n <= seq_len), None) if packed else None
        if slot is None:
            if len(open_rows) >= (OPEN_ROWS if packed else 1):
                open_rows.pop(max(range(len(open_rows)), key=lambda k: open_rows[k][1]))
            rows.append([])
            open_rows.append((len(rows) - 1, 0))
            slot = len(open_rows) - 1
        row, used = open_rows[slot]
        rows[row].append(segment)
        open_rows[slot] = (row, used + n)
    out = {k: np.zeros((len(rows), seq_len), np.float32 if k == "weights" else np.int32) for k in ROW_KEYS}
    for r, row in enumerate(rows):
        at = 0
        for s, segment in enumerate(row, start=1):
            n = len(segment["inputs"])
            for key in ("inputs", "targets", "weights", "positions"):
                out[key][r, at : at + n] = segment[key]
            out["segment_ids"][r, at : at + n] = s
            at += n
    stats = {"examples": len(examples), "rows": len(rows), "truncated": truncated, "dropped": dropped,
             "efficiency": float((out["segment_ids"] > 0).mean())}
    return out, stats


def train_dataset(rows: dict[str, np.ndarray], *, global_batch_size: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """Shuffled, repeated batches of packed rows (a new order every epoch), this process's share."""
    count = len(rows["inputs"])
    if count < global_batch_size:
        raise ValueError(f"the training data packs into {count} rows, fewer than one global batch of "
                         f"{global_batch_size}; lower train.batch_size or data.seq_len, or add data.")
    return batching.per_process_batches(
        batching.shuffled_epochs(count, seed, lambda epoch, i: {k: v[i] for k, v in rows.items()}),
        global_batch_size=global_batch_size, process_index=process_index, process_count=process_count)


def eval_batches(rows: dict[str, np.ndarray], *, global_batch_size: int, max_batches: int = 0,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """The rows in order; a last global batch is filled with weightless padding rows."""
    padding = {k: np.zeros(v.shape[1:], v.dtype) for k, v in rows.items()}
    return batching.eval_batches(len(rows["inputs"]), lambda r: {k: v[r] for k, v in rows.items()},
                                 global_batch_size=global_batch_size, max_batches=max_batches,
                                 process_index=process_index, process_count=process_count, padding=padding)
