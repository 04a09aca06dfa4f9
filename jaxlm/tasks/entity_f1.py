"""Entity-level precision, recall and F1 over IOB tag sequences, counted the way `seqeval` counts
them by default (CoNLL's conlleval): an entity is a maximal chunk of one type; an I-X that does not
continue an X chunk (after O, or after another type) starts a new X entity; a prediction counts
only when its type, start and end all equal a true entity's.
"""

import collections


def _split(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I", "E", "S") or not kind:
        raise ValueError(f"{tag!r} is not an IOB tag (O, or B-/I-/E-/S- and a type)")
    return prefix, kind


def _ends(prev: tuple[str, str], tag: tuple[str, str]) -> bool:
    (prev_prefix, prev_kind), (prefix, kind) = prev, tag
    if prev_prefix == "O":
        return False
    return (prev_prefix in ("E", "S") or prefix in ("B", "S", "O") or kind != prev_kind)


def _starts(prev: tuple[str, str], tag: tuple[str, str]) -> bool:
    (prev_prefix, prev_kind), (prefix, kind) = prev, tag
    if prefix == "O":
        return False
    return (prefix in ("B", "S") or prev_prefix in ("O", "E", "S") or kind != prev_kind)


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """The (type, first, last) token spans of the entities in one sentence's tags."""
    found, start, prev = set(), None, ("O", "")
    for i, tag in enumerate(list(tags) + ["O"]):
        current = _split(tag)
        if start is not None and _ends(prev, current):
            found.add((prev[1], start, i - 1))
            start = None
        if _starts(prev, current):
            start = i
        prev = current
    return found


def entity_scores(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict:
    """Micro-averaged entity `precision`, `recall`, `f1` over sentences, and per type
    (`f1/PER`, ...). Sentences must pair up with the same number of tags."""
    if len(true_tags) != len(predicted_tags):
        raise ValueError(f"{len(true_tags)} true sentences but {len(predicted_tags)} predicted")
    counts = collections.defaultdict(lambda: [0, 0, 0])  # type -> [correct, predicted, true]
    for i, (true, predicted) in enumerate(zip(true_tags, predicted_tags)):
        if len(true) != len(predicted):
            raise ValueError(f"sentence {i}: {len(true)} true tags but {len(predicted)} predicted")
        want, got = entities(true), entities(predicted)
        for kind, *_ in got & want:
            counts[kind][0] += 1
        for kind, *_ in got:
            counts[kind][1] += 1
        for kind, *_ in want:
            counts[kind][2] += 1
    scores = _prf(*(sum(c[j] for c in counts.values()) for j in range(3)))
    for kind, (correct, predicted, true) in sorted(counts.items()):
        scores[f"f1/{kind}"] = _prf(correct, predicted, true)["f1"]
    return scores


def _prf(correct: int, predicted: int, true: int) -> dict:
    precision = correct / predicted if predicted else 0.0
    recall = correct / true if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}
