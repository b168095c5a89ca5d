"""The lexical judge reads every kind of label the offline policy writes (issue #14, item 2): positions,
neighbour conditions on either side, n-grams, token classes, and an output clause it sets aside."""

from __future__ import annotations

import pytest

from autoexplain.evals.judges import LexicalJudge, lexical_positions, output_tokens, split_output

TOKENS = ["<|endoftext|>", "Mary", " went", " store", " on", " the", " cat", " 10", ",", " John", " dog", "."]


@pytest.mark.parametrize(("label", "fires"), [
    ("the first token of a text", {"Mary"}),
    ("tokens at positions 1-3 of a text", {"Mary", " went", " store"}),
    ("the first 2 tokens", {"Mary", " went"}),
    ("any word after 'on'", {" the"}),
    ("any word before 'the'", {" on"}),
    ("animal words after 'the'", {" cat"}),
    ("animal words after 'on'", set()),
    ("capitalised words", {"Mary", " John"}),
    ("numbers", {" 10"}),
    ("punctuation", {",", "."}),
    ("the end of the phrase 'went store'", {" store"}),
    ("the phrase 'went store'", {" went", " store"}),
    ("animals; promotes 'sat', 'ran'", {" cat", " dog"}),
    ("the token 'Mary'; promotes 'John'", {"Mary"}),
    ("promotes 'John'", set()),
])
def test_lexical_judge_reads_each_kind(label: str, fires: set[str]) -> None:
    hit = LexicalJudge()._positions(label, TOKENS)
    assert {TOKENS[i] for i in hit} == fires


def test_output_clause_is_read_apart_from_the_input_side() -> None:
    assert split_output("animals; promotes 'sat', 'ran'") == ("animals", "promotes 'sat', 'ran'")
    assert output_tokens("the token 'Mary'; promotes 'John', 'Anna' and suppresses 'the'") == (
        ("John", "Anna"), ("the",))
    assert output_tokens("animals") == ((), ())
    assert lexical_positions("animals") is None and lexical_positions("positions 2 to 4") == {2, 3, 4}


def test_position_labels_score_a_position_feature_and_lose_on_others() -> None:
    from autoexplain.evals.features import score_explanation
    from autoexplain.evals.truth.planted_features import plant_kinds_harvest

    h = plant_kinds_harvest()
    first = score_explanation("the first token of a text", h.examples[4], LexicalJudge(), sae_id="k",
                              feature_index=4)
    band = score_explanation("the first token of a text", h.examples[11], LexicalJudge(), sae_id="k",
                             feature_index=11)
    assert first.correctness == pytest.approx(1.0) and band.correctness is not None and band.correctness < 0.9
