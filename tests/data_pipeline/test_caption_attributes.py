"""Tests for data_pipeline.caption_attributes: caption parsing and precision/recall scoring."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.caption_attributes import (
    ATTRIBUTES, AttributeScore, CaptionScorer, Mentions, ground_truth_facts, parse_caption,
    score_caption, score_captions, score_table, stutters,
)
from data_pipeline.toy_captions import ALT_TEXT_PHRASES, alt_text, descriptive_caption, short_caption
from data_pipeline.toy_scenes import (
    POSITIONS, WORLDS, Scene, SceneObject, WrittenText, sample_scene, scene_ground_truth,
)

N_SCENES = 1000


def obj(shape: str, colour: str, size: str = "medium", texture: str = "solid",
        position: str = "center", side: int = 20) -> SceneObject:
    """A scene object; only ``side`` (box area) matters for main_subject."""
    return SceneObject(shape, colour, size, texture, position, (0, 0, side, side))


def gt_of(*objects: SceneObject, text: WrittenText | None = None) -> dict:
    """JSON round-tripped ground truth, exactly as the shards store it."""
    scene = Scene(200, 200, "white", tuple(objects), text)
    return json.loads(json.dumps(scene_ground_truth(scene)))


def counts(caption: str, gt: dict) -> dict[str, tuple[int, int, int, int]]:
    """(mentioned, correct, recalled, expected) per attribute."""
    return {a: (s.mentioned, s.correct, s.recalled, s.expected)
            for a, s in score_caption(caption, gt).items()}


def facts(caption: str) -> dict[str, set]:
    """Non-empty fact sets of a caption, as plain sets."""
    return {a: set(f) for a, f in parse_caption(caption).facts.items() if f}


@pytest.fixture(scope="module")
def sources() -> dict[str, dict]:
    """Summaries of gt_dsc, gt_ssc and alt-text over the same N_SCENES random scenes."""
    rng = np.random.default_rng(2024)
    scorers = {"gt_dsc": CaptionScorer(), "gt_ssc": CaptionScorer(), "alt-text": CaptionScorer()}
    for _ in range(N_SCENES):
        scene = sample_scene(rng)
        gt = json.loads(json.dumps(scene_ground_truth(scene)))
        scorers["gt_dsc"].add(descriptive_caption(scene, rng), gt)
        scorers["gt_ssc"].add(short_caption(scene), gt)
        scorers["alt-text"].add(alt_text(scene, rng), gt)
    return {name: s.summary() for name, s in scorers.items()}


# ------------------------------------------------------------------ ground-truth captions


def test_dsc_parses_back_to_exactly_the_ground_truth() -> None:
    """Per caption: parsed facts == expected facts (texture: plus "solid" only if true)."""
    rng = np.random.default_rng(7)
    solid_mentions = 0
    for _ in range(N_SCENES):
        scene = sample_scene(rng, text_probability=0.5)
        dsc = descriptive_caption(scene, rng)
        said, truth = parse_caption(dsc), ground_truth_facts(scene_ground_truth(scene))
        for a in ATTRIBUTES:
            extra = said.facts[a] - truth.facts[a]
            assert extra <= truth.also_true.get(a, frozenset()), (a, dsc, extra)
            assert truth.facts[a] <= said.facts[a], (a, dsc)
        solid_mentions += "solid" in said.facts["texture"]
    assert solid_mentions > 50  # the optional "solid" really occurs and is scored as correct


def test_dsc_scores_precision_and_recall_one_on_every_attribute(sources: dict) -> None:
    dsc = sources["gt_dsc"]
    assert dsc["captions"] == N_SCENES and dsc["empty"] == 0
    for a in ATTRIBUTES:
        stats = dsc["per_attribute"][a]
        assert stats["expected"] > 0, a
        assert stats["precision"] == 1.0 and stats["recall"] == 1.0, (a, stats)
    tex = dsc["per_attribute"]["texture"]
    assert tex["mentioned"] > tex["expected"]  # "solid" mentions: correct, never expected
    assert tex["correct"] == tex["mentioned"] and tex["recalled"] == tex["expected"]
    assert dsc["overall"]["precision"] == 1.0 and dsc["overall"]["recall"] == 1.0


def test_ssc_is_precise_but_partial(sources: dict) -> None:
    ssc = sources["gt_ssc"]["per_attribute"]
    for a in ("colour", "shape", "colour_shape", "size", "texture"):
        assert ssc[a]["precision"] == 1.0, a
        assert 0.2 < ssc[a]["recall"] < 0.7, (a, ssc[a])
    for a in ("position", "count", "word"):
        assert ssc[a]["mentioned"] == 0 and ssc[a]["recall"] == 0.0
    assert sources["gt_ssc"]["mean_words"] < 5


def test_ssc_exact_counts_on_a_hand_built_scene() -> None:
    main = obj("circle", "red", "large", "striped", "top left", side=60)
    gt = gt_of(main, obj("star", "blue", "small", "solid", "right"),
               obj("heart", "green", "medium", "dotted", "bottom"))
    ssc = short_caption(Scene(200, 200, "white", (main,), None))
    assert ssc == "a large red striped circle"
    assert counts(ssc, gt) == {
        "colour": (1, 1, 1, 3), "shape": (1, 1, 1, 3), "colour_shape": (1, 1, 1, 3),
        "texture": (1, 1, 1, 2), "size": (1, 1, 1, 3), "position": (0, 0, 0, 3),
        "count": (0, 0, 0, 1), "word": (0, 0, 0, 0)}
    plain = gt_of(obj("square", "yellow", side=50), obj("cross", "pink", "large", "striped"))
    assert counts("a yellow square", plain)["size"] == (0, 0, 0, 2)
    assert counts("a yellow square", plain)["texture"] == (0, 0, 0, 1)


# ------------------------------------------------------------------ alt text


def test_alt_text_is_sometimes_wrong_and_recalls_far_less(sources: dict) -> None:
    alt, dsc = sources["alt-text"], sources["gt_dsc"]
    assert 60 <= alt["empty"] <= 140  # ~10% empty alt texts, still counted
    for a in ("colour", "shape", "colour_shape"):
        assert alt["per_attribute"][a]["precision"] < 0.8, a  # ~15% are wrong
    for a in ("position", "count", "texture"):
        assert alt["per_attribute"][a]["recalled"] == 0, a
    assert alt["overall"]["recall"] < 0.15 < 0.5 * dsc["overall"]["recall"]
    assert alt["overall"]["precision"] < 0.8
    assert alt["per_attribute"]["colour"]["expected"] == dsc["per_attribute"]["colour"]["expected"]


def test_empty_captions_add_only_expected() -> None:
    gt = gt_of(obj("circle", "red"), text=WrittenText("apple", "blue", (0, 0, 1, 1)))
    for empty in ("", "   "):
        c = counts(empty, gt)
        assert all(m == k == r == 0 for m, k, r, _ in c.values())
        assert [c[a][3] for a in ATTRIBUTES] == [2, 1, 1, 0, 1, 1, 1, 1]


def test_file_names_shop_phrases_and_vague_text_mention_nothing() -> None:
    vague = ["IMG_4821.jpg", "DSC01234.JPG", "image (3).png", "stock-photo-8812391.jpg",
             "PXL_20230512_123456.jpg", "shapes on a white background", "some colourful objects",
             "a picture of things", "abstract art"]
    for text in [*ALT_TEXT_PHRASES, *vague]:
        assert facts(text) == {}, text


# ------------------------------------------------------------------ hand-written captions


def test_wrong_colour_binding_scores_half() -> None:
    gt = gt_of(obj("circle", "red"), obj("square", "green"))
    c = counts("a red circle and a blue square", gt)
    assert c["colour"] == (2, 1, 1, 2) and c["shape"] == (2, 2, 2, 2)
    assert c["colour_shape"] == (2, 1, 1, 2)
    s = score_caption("a red circle and a blue square", gt)["colour"]
    assert (s.precision, s.recall) == (0.5, 0.5)
    # Right colours on the wrong shapes: every colour and shape right, no binding right.
    assert counts("a green circle and a red square", gt)["colour_shape"] == (2, 0, 0, 2)


def test_counts_and_words_right_and_wrong() -> None:
    gt = gt_of(obj("circle", "red"), obj("star", "blue"),
               text=WrittenText("apple", "pink", (0, 0, 1, 1)))
    assert counts("Two shapes on a beige backdrop.", gt)["count"] == (1, 1, 1, 1)
    assert counts("three shapes", gt)["count"] == (1, 0, 0, 1)
    assert counts("2 objects", gt)["count"] == (1, 1, 1, 1)
    assert facts("two red circles") == {"colour": {"red"}, "shape": {"circle"},
                                        "colour_shape": {("red", "circle")}}  # group, not total
    assert counts('The word "apple" is written in pink.', gt)["word"] == (1, 1, 1, 1)
    assert counts('The word "pear" is written in pink.', gt)["word"] == (1, 0, 0, 1)
    assert counts("the word apple", gt)["word"] == (1, 1, 1, 1)
    assert counts('the word "Apple."', gt)["word"] == (1, 1, 1, 1)
    # The word's colour is a colour in the picture; a quoted colour name is only a word.
    assert counts('written in pink', gt)["colour"] == (1, 1, 1, 3)
    assert facts('the word "red"') == {"word": {"red"}}


def test_positions_match_longest_first_and_bind_to_shapes() -> None:
    assert facts("a star towards the top left")["position"] == {("top left", "star")}
    assert facts("a star at the top")["position"] == {("top", "star")}
    assert facts("a star at the top-left corner")["position"] == {("top left", "star")}
    assert facts("a star near the centre")["position"] == {("center", "star")}
    gt = gt_of(obj("star", "red", position="top left"), obj("circle", "red", position="top"))
    assert counts("a red star at the top", gt)["position"] == (1, 0, 0, 2)
    assert counts("a red star at the top left and a red circle at the top", gt)["position"] \
        == (2, 2, 2, 2)
    assert counts("a red circle towards the top left", gt)["position"] == (1, 0, 0, 2)
    # Unbound positions are stated but never correct.
    assert facts("towards the top left")["position"] == {("top left", None)}
    assert counts("something in the top left", gt)["position"] == (1, 0, 0, 2)


@pytest.mark.parametrize("sentence", [
    "A small red triangle sits towards the bottom.",
    "A small red triangle is placed at the bottom.",
    "A small red triangle can be seen near the bottom edge.",
    "At the bottom, there is a small red triangle.",
    "Towards the bottom, there is a small red triangle.",
    "Two shapes: a small red triangle along the bottom and a large blue star on the right side.",
    "The red triangle at the bottom is small.",
    "The red triangle near the bottom edge is small and striped.",
])
def test_every_dsc_position_and_size_form_binds(sentence: str) -> None:
    f = facts(sentence)
    assert ("bottom", "triangle") in f["position"] and ("small", "triangle") in f["size"]
    assert ("red", "triangle") in f["colour_shape"]
    assert all(shape is not None for _, shape in f["position"] | f["size"])


def test_sizes_bind_to_shapes_or_count_as_wrong() -> None:
    gt = gt_of(obj("hexagon", "blue", "large", "dotted"), obj("circle", "red", "small"))
    assert counts("a large blue dotted hexagon", gt)["size"] == (1, 1, 1, 2)
    assert counts("a large dotted blue hexagon", gt)["size"] == (1, 1, 1, 2)
    assert counts("a large red circle", gt)["size"] == (1, 0, 0, 2)
    assert counts("a large one", gt)["size"] == (1, 0, 0, 2)  # ("large", None)


def test_texture_solid_is_optional() -> None:
    solid = gt_of(obj("circle", "red", texture="solid"), obj("star", "blue", texture="striped"))
    assert counts("a solid red circle and a striped blue star", solid)["texture"] == (2, 2, 1, 1)
    assert counts("a red circle", solid)["texture"] == (0, 0, 0, 1)
    no_solid = gt_of(obj("circle", "red", texture="dotted"))
    assert counts("a solid red circle", no_solid)["texture"] == (1, 0, 0, 1)
    assert counts("a dotted red circle", no_solid)["texture"] == (1, 1, 1, 1)


def test_plurals_case_and_punctuation() -> None:
    gt = gt_of(obj("cross", "purple"), obj("cross", "purple"), obj("diamond", "orange"))
    c = counts("THREE SHAPES: two Purple Crosses; one ORANGE diamond!", gt)
    assert c["shape"] == (2, 2, 2, 2) and c["colour_shape"] == (2, 2, 2, 2)
    assert c["count"] == (1, 1, 1, 1)
    # Punctuation ends a noun phrase: no binding across a full stop or comma.
    assert facts("It is red. Crosses too.")["shape"] == {"cross"}
    assert "colour_shape" not in facts("It is red. Crosses too.")
    assert "colour_shape" not in facts("red, crosses")
    # Whole words only.
    assert facts("reddish circled squares-ish")["shape"] == {"square"}
    assert "colour" not in facts("reddish stars")


def test_mentions_has_every_attribute() -> None:
    m = parse_caption("")
    assert isinstance(m, Mentions) and set(m.facts) == set(ATTRIBUTES)
    assert all(f == frozenset() for f in m.facts.values())
    assert set(ground_truth_facts(gt_of(obj("star", "red"))).facts) == set(ATTRIBUTES)


def test_ground_truth_facts_exact_and_validated() -> None:
    gt = gt_of(obj("star", "red", "small", "striped", "top"),
               obj("star", "brown", "small", "solid", "left"),
               text=WrittenText("Moon", "green", (0, 0, 1, 1)))
    f = ground_truth_facts(gt)
    assert f.facts["colour"] == {"red", "brown", "green"}
    assert f.facts["colour_shape"] == {("red", "star"), ("brown", "star")}
    assert f.facts["size"] == {("small", "star")}
    assert f.facts["position"] == {("top", "star"), ("left", "star")}
    assert f.facts["texture"] == {"striped"} and f.also_true["texture"] == {"solid"}
    assert f.facts["count"] == {2} and f.facts["word"] == {"moon"}
    with pytest.raises(ValueError, match="objects"):
        ground_truth_facts({"text": None})
    with pytest.raises(ValueError, match="colour"):
        ground_truth_facts({"objects": [{"shape": "star"}]})
    with pytest.raises(TypeError):
        parse_caption(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------ aggregation and table


def test_attribute_score_conventions() -> None:
    s = AttributeScore(mentioned=4, correct=3, recalled=2, expected=8)
    assert (s.precision, s.recall) == (0.75, 0.25)
    assert (AttributeScore().precision, AttributeScore().recall) == (0.0, 0.0)
    assert s + AttributeScore(1, 1, 1, 2) == AttributeScore(5, 4, 3, 10)


def test_scorer_micro_averages() -> None:
    gt1 = gt_of(obj("circle", "red"), obj("square", "green"))
    gt2 = gt_of(obj("star", "blue"))
    scorer = CaptionScorer()
    scorer.add("a red circle and a blue square", gt1)  # colour 2 said, 1 right; 2 expected
    scorer.add("", gt2)                                  # colour 0 said; 1 expected
    scorer.add("a blue star", gt2)                       # colour 1 said, 1 right; 1 expected
    out = scorer.summary()
    assert set(out) == {"captions", "mean_words", "empty", "distinct", "stutters", "per_attribute", "overall"}
    assert out["captions"] == 3 and out["empty"] == 1 and out["mean_words"] == 10 / 3
    assert out["distinct"] == 2 and out["stutters"] == 0
    colour = out["per_attribute"]["colour"]
    assert colour == {"precision": 2 / 3, "recall": 2 / 4, "mentioned": 3, "correct": 2,
                      "recalled": 2, "expected": 4}
    assert set(out["per_attribute"]) == set(ATTRIBUTES)
    # overall sums facts over attributes: colour 3/2/2/4, shape 3/3/3/4, colour_shape 3/2/2/4,
    # size 0/0/0/4, position 0/0/0/4, count 0/0/0/3 (texture, word: nothing expected).
    assert out["overall"] == {"precision": 7 / 9, "recall": 7 / 23, "mentioned": 9,
                              "correct": 7, "recalled": 7, "expected": 23}
    assert score_captions(["a red circle and a blue square", "", "a blue star"],
                          [gt1, gt2, gt2]) == out
    with pytest.raises(ValueError, match="pair"):
        score_captions(["a"], [])
    assert CaptionScorer().summary()["mean_words"] == 0.0


def test_score_table_lists_sources_and_numbers(sources: dict) -> None:
    table = score_table(sources)
    lines = table.splitlines()
    for name in ("gt_dsc", "gt_ssc", "alt-text"):
        assert name in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) >= {*ATTRIBUTES, "overall", "mean", "empty", "distinct", "stutters"}
    assert rows["stutters"].split()[1:4] == ["0", "/", str(sources["gt_dsc"]["captions"])]
    assert rows["colour"].count("P 1.00 / R 1.00") == 1  # gt_dsc only
    assert "P   -  / R 0.00" in rows["position"]  # SSC and alt-text never state positions
    mean = f"{sources['gt_dsc']['mean_words']:.1f}"
    assert mean in rows["mean"]
    assert len({len(line) for line in lines}) == 1  # fixed width
    with pytest.raises(ValueError):
        score_table({})
    assert "vs other image" not in table


def test_score_table_shows_the_other_image_control(sources: dict) -> None:
    other = {"precision": 0.25, "recall": 0.125, "mentioned": 4, "correct": 1, "recalled": 1, "expected": 8}
    table = score_table({name: {**r, "other_image": other} for name, r in sources.items()})
    row = next(line for line in table.splitlines() if line.startswith("vs other image"))
    assert row.count("P 0.25 / R 0.12") == len(sources)


def test_positions_vocabulary_is_covered() -> None:
    for p in POSITIONS:
        assert facts(f"a heart in the {p}")["position"] == {(p, "heart")}


def test_tokenizer_decoded_text_parses_like_the_original() -> None:
    """CLIP-BPE style decodes (lower case, spaced punctuation and quotes) lose no facts."""
    rng = np.random.default_rng(5)
    for _ in range(50):
        scene = sample_scene(rng, text_probability=1.0)
        dsc = descriptive_caption(scene, rng)
        decoded = dsc.lower().replace('"', ' " ').replace(".", " .").replace(",", " ,")
        assert parse_caption(decoded) == parse_caption(dsc), decoded
    assert facts('the word " apple " is written in red .')["word"] == {"apple"}
    # Only the adjacent colour binds in "red and blue circles" (documented simplification).
    assert facts("red and blue circles")["colour_shape"] == {("blue", "circle")}


@pytest.mark.parametrize("caption,expected", [
    ("a medium striped striped cross", True), ("a pink star pink star", True), ("a brown cross brown", True),
    ("A Red circle RED", True), ("a brown cross", False), ("one shape: one red circle", False),
    ("one red circle and one red circle", False), ("the red circle is small. the red square is large.", False),
    ("", False),
])
def test_stutters_flags_a_word_that_comes_back_within_two_words_of_a_clause(caption: str, expected: bool) -> None:
    assert stutters(caption) is expected


def test_no_ground_truth_caption_stutters_and_distinct_counts_texts() -> None:
    rng = np.random.default_rng(7)
    captions = []
    for world in ("shapes", "full"):
        for _ in range(N_SCENES):
            scene = sample_scene(rng, world=WORLDS[world], text_probability=0.4)
            captions += [descriptive_caption(scene, rng), short_caption(scene), alt_text(scene, rng)]
    assert [c for c in captions if stutters(c)] == []
    scorer = CaptionScorer()
    for caption in ("a red circle", "A red  circle", "a blue circle", "", "a red circle red"):
        scorer.add(caption, gt_of(obj("circle", "red")))
    out = scorer.summary()
    assert (out["distinct"], out["stutters"], out["empty"]) == (3, 1, 1)  # case and spacing ignored
