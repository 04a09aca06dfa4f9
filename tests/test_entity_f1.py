"""Entity-level F1 on hand-made cases, counted the way seqeval (conlleval) counts."""

import pytest

from jaxlm.tasks.entity_f1 import entities, entity_scores


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC"], {("PER", 0, 1), ("LOC", 3, 3)}),
    (["B-PER", "B-PER"], {("PER", 0, 0), ("PER", 1, 1)}),  # B starts a new entity
    (["O", "I-ORG", "I-ORG"], {("ORG", 1, 2)}),  # I after O starts one (IOB1 style)
    (["B-ORG", "I-LOC", "I-LOC"], {("ORG", 0, 0), ("LOC", 1, 2)}),  # a type change splits
    (["I-MISC"], {("MISC", 0, 0)}),
    (["O", "O"], set()),
])
def test_entities_are_maximal_chunks_of_one_type(tags, expected):
    assert entities(tags) == expected


def test_seqevals_documented_example():
    true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predicted = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(true, predicted)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 0.5
    assert scores["f1/PER"] == 1.0 and scores["f1/MISC"] == 0.0


def test_precision_and_recall_differ_when_counts_differ():
    true = [["B-PER", "O", "B-LOC", "O"]]
    predicted = [["B-PER", "O", "O", "B-ORG"]]  # one right, one missed, one spurious
    scores = entity_scores(true, predicted)
    assert scores["precision"] == pytest.approx(1 / 2)
    assert scores["recall"] == pytest.approx(1 / 2)
    predicted = [["B-PER", "O", "B-LOC", "B-ORG"]]
    scores = entity_scores(true, predicted)
    assert (scores["precision"], scores["recall"]) == (pytest.approx(2 / 3), 1.0)
    assert scores["f1"] == pytest.approx(0.8)


def test_a_partial_span_is_wrong():
    assert entity_scores([["B-ORG", "I-ORG", "I-ORG"]], [["B-ORG", "I-ORG", "O"]])["f1"] == 0.0


@pytest.mark.parametrize("true, predicted, message", [
    ([["O"]], [["O"], ["O"]], "1 true sentences but 2"),
    ([["O", "O"]], [["O"]], "sentence 0: 2 true tags but 1"),
    ([["X-PER"]], [["O"]], "not an IOB tag"),
])
def test_mismatched_or_bad_input_is_an_error(true, predicted, message):
    with pytest.raises(ValueError, match=message):
        entity_scores(true, predicted)
