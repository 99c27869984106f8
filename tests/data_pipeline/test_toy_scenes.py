"""Tests for data_pipeline.toy_scenes: sampling, rendering, captions and alt text."""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter

import numpy as np
import pytest

from data_pipeline.toy_captions import (
    ALT_TEXT_PHRASES, NUMBER_WORDS, alt_text, descriptive_caption, main_subject, plural, short_caption,
)
from data_pipeline.toy_scenes import (
    ASPECT_RATIOS, BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES, WORDS, WORLDS, Scene, SceneObject,
    WrittenText, background_array, render_scene, sample_scene, scene_ground_truth, shape_mask, text_colours,
)

N_SCENES = 2000
FILENAME_RE = re.compile(r"^[\w\- ()]+\.(jpg|JPG|jpeg|png)$")
# Longest alternatives first so "top left" wins over "top".
POSITION_RE = re.compile(r"\b(" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")\b")
SIZE_FRACTIONS = {"small": 0.20, "medium": 0.32, "large": 0.45}


def mentions(text: str, term: str) -> bool:
    """Whole-word, case-insensitive mention of ``term`` in ``text``."""
    return re.search(rf"\b{re.escape(term)}\b", text.lower()) is not None


def shapes_in(text: str) -> set[str]:
    return {s for s in SHAPES if mentions(text, s) or mentions(text, plural(s))}


def colours_in(text: str) -> set[str]:
    return {c for c in COLOURS if mentions(text, c)}


def words_of(texts: list[str] | tuple[str, ...]) -> set[str]:
    return {w for t in texts for w in t.split()}


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    rng = np.random.default_rng(1234)
    return [sample_scene(rng) for _ in range(N_SCENES)]


@pytest.fixture(scope="module")
def text_scenes() -> list[Scene]:
    """Scenes that always try to carry a word (most succeed)."""
    rng = np.random.default_rng(99)
    return [sample_scene(rng, text_probability=1.0) for _ in range(400)]


# ------------------------------------------------------------------ constants


def test_constants_sizes_and_vocabulary() -> None:
    assert len(set(SHAPES)) == len(SHAPES) >= 6
    assert len(COLOURS) == 8 and len(set(COLOURS.values())) == 8
    assert SIZES == ("small", "medium", "large")
    assert TEXTURES == ("solid", "striped", "dotted")
    assert len(POSITIONS) == 9 and "top left" in POSITIONS and "center" in POSITIONS
    assert len(BACKGROUNDS) >= 6
    assert ASPECT_RATIOS == ((1, 1), (4, 3), (3, 4), (16, 9), (9, 16), (2, 1), (1, 2))
    assert len(WORDS) >= 40 and len(set(WORDS)) == len(WORDS)
    assert all(re.fullmatch(r"[a-z]+", w) for w in WORDS)


def test_vocabularies_do_not_collide() -> None:
    """Words, backgrounds and shop phrases never contain attribute words (keeps parsing exact)."""
    attribute_words = (set(SHAPES) | {plural(s) for s in SHAPES} | set(COLOURS) | set(SIZES)
                       | set(TEXTURES) | words_of(POSITIONS))
    assert not set(WORDS) & (attribute_words | words_of(tuple(BACKGROUNDS)))
    assert not words_of(tuple(BACKGROUNDS)) & attribute_words
    assert not words_of(ALT_TEXT_PHRASES) & attribute_words


def test_plural() -> None:
    assert plural("circle") == "circles"
    assert plural("cross") == "crosses"
    assert plural("hexagon") == "hexagons"


def test_every_background_has_contrasting_text_colours() -> None:
    for name, spec in BACKGROUNDS.items():
        choices = text_colours(name)
        assert len(choices) >= 3, name
        # No text colour is close to the background: sum of abs channel differences.
        for c in choices:
            assert sum(abs(a - b) for a, b in zip(COLOURS[c], spec.start)) > 120, (name, c)


# ------------------------------------------------------------------ determinism


def test_same_seed_gives_identical_scene_render_and_captions() -> None:
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(20):
        sa, sb = sample_scene(a, text_probability=0.7), sample_scene(b, text_probability=0.7)
        assert sa == sb
        assert np.array_equal(np.asarray(render_scene(sa)), np.asarray(render_scene(sb)))
        assert short_caption(sa) == short_caption(sb)
        assert descriptive_caption(sa, a) == descriptive_caption(sb, b)
        assert alt_text(sa, a) == alt_text(sb, b)


def test_different_seeds_give_different_scenes() -> None:
    s1, s2 = sample_scene(np.random.default_rng(1)), sample_scene(np.random.default_rng(2))
    assert s1 != s2
    assert not np.array_equal(np.asarray(render_scene(s1)), np.asarray(render_scene(s2)))
    batch = [sample_scene(np.random.default_rng(seed)) for seed in range(50)]
    assert len({repr(s) for s in batch}) == 50


def test_render_is_repeatable_for_the_same_scene() -> None:
    scene = sample_scene(np.random.default_rng(3), text_probability=1.0)
    assert render_scene(scene).tobytes() == render_scene(scene).tobytes()


# ------------------------------------------------------------------ sampling statistics


def test_all_attribute_values_occur(scenes: list[Scene]) -> None:
    objs = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objs} == set(SHAPES)
    assert {o.colour for o in objs} == set(COLOURS)
    assert {o.size for o in objs} == set(SIZES)
    assert {o.texture for o in objs} == set(TEXTURES)
    assert {o.position for o in objs} == set(POSITIONS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {len(s.objects) for s in scenes} == {1, 2, 3, 4}
    assert {s.text.word for s in scenes if s.text} >= set(WORDS[:10])


def test_text_fraction_tracks_text_probability(scenes: list[Scene]) -> None:
    frac = sum(s.text is not None for s in scenes) / len(scenes)
    assert abs(frac - 0.4) < 0.05
    rng = np.random.default_rng(5)
    assert all(sample_scene(rng, text_probability=0.0).text is None for _ in range(200))
    always = [sample_scene(rng, text_probability=1.0).text is not None for _ in range(300)]
    assert sum(always) / len(always) > 0.9


def _closest_ratio(scene: Scene) -> tuple[int, int]:
    return min(ASPECT_RATIOS, key=lambda r: abs(scene.width / scene.height - r[0] / r[1]))


def test_image_sizes_and_aspect_ratios(scenes: list[Scene]) -> None:
    for s in scenes:
        long, short = max(s.width, s.height), min(s.width, s.height)
        assert 128 <= long <= 512 and long % 16 == 0
        assert short % 8 == 0 and short >= 64
        a, b = _closest_ratio(s)
        assert (a >= b) == (s.width >= s.height)
        # short side was rounded to a multiple of 8: at most 4 px off the exact ratio
        assert abs(short - long * min(a, b) / max(a, b)) <= 4
    assert Counter(_closest_ratio(s) for s in scenes).keys() == set(ASPECT_RATIOS)
    assert {max(s.width, s.height) for s in scenes} >= {128, 512}


def test_boxes_inside_image_disjoint_and_positions_match(scenes: list[Scene]) -> None:
    for s in scenes:
        boxes = [o.box for o in s.objects] + ([s.text.box] if s.text else [])
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                overlap_x = min(a[2], b[2]) - max(a[0], b[0])
                overlap_y = min(a[3], b[3]) - max(a[1], b[1])
                assert overlap_x < 0 or overlap_y < 0, (a, b)  # separated by a gap
        for o in s.objects:
            cx, cy = (o.box[0] + o.box[2]) / 2, (o.box[1] + o.box[3]) / 2
            col = min(2, int(3 * cx / s.width))
            row = min(2, int(3 * cy / s.height))
            assert o.position == POSITIONS[3 * row + col]


def test_size_classes_are_separable(scenes: list[Scene]) -> None:
    ratios: dict[str, list[float]] = {k: [] for k in SIZES}
    for s in scenes:
        short = min(s.width, s.height)
        for o in s.objects:
            side = o.box[2] - o.box[0]
            assert side == o.box[3] - o.box[1]  # square boxes
            ratios[o.size].append(side / short)
            assert abs(side / short - SIZE_FRACTIONS[o.size]) <= 0.03 + 0.5 / short + 1e-9
    assert max(ratios["small"]) < min(ratios["medium"])
    assert max(ratios["medium"]) < min(ratios["large"])


# ------------------------------------------------------------------ rendering


def test_render_pixels_match_ground_truth(scenes: list[Scene]) -> None:
    for s in scenes[:300]:
        img = render_scene(s)
        assert img.mode == "RGB" and img.size == (s.width, s.height)
        px = np.asarray(img)
        free = np.ones((s.height, s.width), dtype=bool)  # pixels not covered by anything
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            free[y0:y1, x0:x1] = False
            inside = np.asarray(shape_mask(o.shape, x1 - x0)) == 255
            region = px[y0:y1, x0:x1]
            is_colour = np.all(region == COLOURS[o.colour], axis=-1)
            is_white = np.all(region == 255, axis=-1)
            frac = is_colour[inside].mean()
            if o.texture == "solid":
                assert frac == 1.0
                c = (x1 - x0) // 2  # centre 3x3 block has exactly the colour
                assert np.all(region[c - 1:c + 2, c - 1:c + 2] == COLOURS[o.colour])
            else:
                assert 0.55 <= frac < 1.0, (o, frac)
                assert np.all(is_colour[inside] | is_white[inside])  # colour + white only
            # Outside the shape but inside its box: untouched background.
            bg = background_array(s.background, s.width, s.height)[y0:y1, x0:x1]
            assert np.array_equal(region[~inside], bg[~inside])
        if s.text:
            x0, y0, x1, y1 = s.text.box
            free[max(0, y0 - 2):y1 + 2, max(0, x0 - 2):x1 + 2] = False
            ink = px[y0:y1, x0:x1].astype(int)
            dist = np.abs(ink - np.array(COLOURS[s.text.colour])).sum(axis=-1)
            assert dist.min() < 60  # glyph interiors reach the text colour
        bg = background_array(s.background, s.width, s.height)
        assert np.array_equal(px[free], bg[free])


def test_background_arrays_solid_and_gradient() -> None:
    for name, spec in BACKGROUNDS.items():
        arr = background_array(name, 40, 30).astype(int)
        assert arr.shape == (30, 40, 3)
        assert tuple(arr[0, 0]) == spec.start
        far = arr[-1, 0] if spec.vertical else arr[0, -1]
        assert tuple(far) == spec.end
        if spec.start == spec.end:
            assert np.all(arr == spec.start)
        else:  # constant across the gradient direction's orthogonal axis
            assert np.all(arr == (arr[:, :1] if spec.vertical else arr[:1, :]))
    assert any(s.start != s.end for s in BACKGROUNDS.values())
    assert any(s.start == s.end for s in BACKGROUNDS.values())


def test_shape_masks_are_distinct() -> None:
    masks = {s: np.asarray(shape_mask(s, 64)) > 0 for s in SHAPES}
    for i, a in enumerate(SHAPES):
        assert 0.2 < masks[a].mean() <= 1.0, a
        for b in SHAPES[i + 1:]:
            assert np.mean(masks[a] != masks[b]) > 0.05, (a, b)


# ------------------------------------------------------------------ captions


def test_descriptive_caption_mentions_everything(scenes: list[Scene],
                                                 text_scenes: list[Scene]) -> None:
    rng = np.random.default_rng(11)
    for s in scenes[:300] + text_scenes:
        dsc = descriptive_caption(s, rng)
        low = dsc.lower()
        assert mentions(low, NUMBER_WORDS[len(s.objects)])
        assert mentions(low, s.background)
        for o in s.objects:
            assert mentions(low, o.colour) and mentions(low, o.size)
            assert mentions(low, o.shape) or mentions(low, plural(o.shape))
        # Exact parsability: the attribute sets read off the text equal the truth.
        assert shapes_in(dsc) == {o.shape for o in s.objects}
        expected_colours = {o.colour for o in s.objects} | ({s.text.colour} if s.text else set())
        assert colours_in(dsc) == expected_colours
        assert {z for z in SIZES if mentions(low, z)} == {o.size for o in s.objects}
        assert set(POSITION_RE.findall(low)) == {o.position for o in s.objects}
        for tex in ("striped", "dotted"):
            assert mentions(low, tex) == any(o.texture == tex for o in s.objects)
        if s.text:
            assert f'"{s.text.word}"' in dsc
            assert dsc.count('"') == 2
        else:
            assert '"' not in dsc


def test_descriptive_caption_structures_vary(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(12)
    vocab = (set(COLOURS) | set(SIZES) | set(TEXTURES) | set(NUMBER_WORDS)
             | words_of(tuple(BACKGROUNDS)))
    openings = Counter()
    for s in scenes[:200]:
        first = descriptive_caption(s, rng).lower().replace(",", "").split()[:3]
        openings[tuple("<v>" if w in vocab else w for w in first)] += 1
    assert len(openings) >= 4, openings
    assert max(openings.values()) / 200 < 0.5  # no single structure dominates
    # The same scene is described differently under different rng draws.
    variants = {descriptive_caption(scenes[0], np.random.default_rng(i)) for i in range(30)}
    assert len(variants) >= 5


def test_short_caption_is_main_subject_only(scenes: list[Scene]) -> None:
    for s in scenes[:500]:
        ssc, main = short_caption(s), main_subject(s)
        assert ssc == short_caption(s)
        assert mentions(ssc, main.colour) and mentions(ssc, main.shape)
        assert shapes_in(ssc) == {main.shape}
        assert colours_in(ssc) == {main.colour}
        assert not any(mentions(ssc, w) for w in words_of(tuple(BACKGROUNDS)))
        if s.text:
            assert not mentions(ssc, s.text.word)
        if main.texture != "solid":
            assert mentions(ssc, main.texture)
        assert '"' not in ssc and len(ssc.split()) <= 5


def test_main_subject_is_largest_first_on_ties() -> None:
    def obj(shape: str, side: int, x0: int) -> SceneObject:
        return SceneObject(shape, "red", "small", "solid", "left", (x0, 0, x0 + side, side))

    s = Scene(300, 100, "white", (obj("circle", 20, 0), obj("star", 40, 50),
                                  obj("heart", 40, 100)), None)
    assert main_subject(s).shape == "star"
    s2 = dataclasses.replace(s, objects=(obj("cross", 60, 200),) + s.objects)
    assert main_subject(s2).shape == "cross"
    assert short_caption(s2) == "a small red cross"
    big = SceneObject("hexagon", "orange", "large", "striped", "center", (0, 0, 50, 50))
    assert short_caption(dataclasses.replace(s, objects=(big,))) == "a large orange striped hexagon"


def test_scene_ground_truth_is_json_and_exact(text_scenes: list[Scene]) -> None:
    s = next(s for s in text_scenes if s.text and len(s.objects) >= 2)
    gt = json.loads(json.dumps(scene_ground_truth(s)))
    assert gt["background"] == s.background
    assert gt["text"] == {"word": s.text.word, "colour": s.text.colour, "box": list(s.text.box)}
    assert [o["box"] for o in gt["objects"]] == [list(o.box) for o in s.objects]
    assert [(o["shape"], o["colour"], o["size"], o["texture"], o["position"])
            for o in gt["objects"]] == [(o.shape, o.colour, o.size, o.texture, o.position)
                                        for o in s.objects]
    no_text = dataclasses.replace(s, text=None)
    assert scene_ground_truth(no_text)["text"] is None


# ------------------------------------------------------------------ alt text


def classify_alt(alt: str, s: Scene) -> str:
    if alt == "":
        return "empty"
    if FILENAME_RE.match(alt):
        return "filename"
    if alt in ALT_TEXT_PHRASES:
        return "shop"
    if (colours_in(alt) - {o.colour for o in s.objects}
            or shapes_in(alt) - {o.shape for o in s.objects}):
        return "wrong"
    return "partial"


def correct_attributes(alt: str, s: Scene) -> int:
    """How many true scene attributes (object attributes, background, word) ``alt`` names."""
    objs = s.objects
    n = len(colours_in(alt) & {o.colour for o in objs})
    n += len(shapes_in(alt) & {o.shape for o in objs})
    n += sum(mentions(alt, z) for z in {o.size for o in objs} | {o.texture for o in objs})
    n += len(set(POSITION_RE.findall(alt.lower())) & {o.position for o in objs})
    n += mentions(alt, s.background) + bool(s.text and mentions(alt, s.text.word))
    return n


def test_alt_text_category_frequencies(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(21)
    cats = Counter(classify_alt(alt_text(s, rng), s) for s in scenes)
    freq = {k: v / len(scenes) for k, v in cats.items()}
    expected = {"empty": 0.10, "filename": 0.15, "shop": 0.15, "partial": 0.45, "wrong": 0.15}
    for k, p in expected.items():
        assert abs(freq.get(k, 0.0) - p) < 0.04, (k, freq)


def test_alt_text_is_short_partial_and_never_mentions_text_colour(
        scenes: list[Scene], text_scenes: list[Scene]) -> None:
    rng = np.random.default_rng(22)
    word_mentions = 0
    for s in scenes + text_scenes:
        alt = alt_text(s, rng)
        assert len(alt) <= len(descriptive_caption(s, rng))
        assert correct_attributes(alt, s) <= 2
        if classify_alt(alt, s) == "partial":
            assert correct_attributes(alt, s) >= 1, alt
        if s.text and s.text.colour not in {o.colour for o in s.objects}:
            assert not mentions(alt, s.text.colour), (alt, s.text)
        if s.text and mentions(alt, s.text.word):
            word_mentions += 1
    with_text = sum(s.text is not None for s in scenes + text_scenes)
    assert word_mentions / with_text < 0.05  # the word appears at most rarely


def test_alt_text_file_names_look_like_files() -> None:
    rng = np.random.default_rng(23)
    scene = sample_scene(rng)
    names = {a for a in (alt_text(scene, rng) for _ in range(1000)) if FILENAME_RE.match(a)}
    prefixes = {re.split(r"[_\d (-]", n)[0] for n in names}
    assert {"IMG", "DSC", "image", "stock"} <= prefixes
    assert any(n.endswith(".JPG") for n in names) and any(n.endswith(".png") for n in names)


def test_written_text_dataclass_fields() -> None:
    t = WrittenText("apple", "red", (1, 2, 3, 4))
    assert dataclasses.astuple(t) == ("apple", "red", (1, 2, 3, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.word = "pear"  # type: ignore[misc]


# ------------------------------------------------------------------ the shapes world (the demo's)


@pytest.fixture(scope="module")
def shape_scenes() -> list[Scene]:
    rng = np.random.default_rng(2024)
    return [sample_scene(rng, text_probability=0.0, world=WORLDS["shapes"]) for _ in range(N_SCENES)]


def test_shapes_world_keeps_the_issue_minimums(shape_scenes: list[Scene]) -> None:
    """>= 6 shapes, >= 8 colours, 3 sizes, >= 5 positions, several backgrounds, 1-3 objects, all
    occurring; only solid textures and no words; no hexagon (a small one reads as a circle)."""
    objects = [o for s in shape_scenes for o in s.objects]
    assert {o.shape for o in objects} == set(WORLDS["shapes"].shapes) == set(SHAPES) - {"hexagon"}
    assert len(WORLDS["shapes"].shapes) >= 6
    assert {o.colour for o in objects} == set(COLOURS) and len(COLOURS) >= 8
    assert {o.size for o in objects} == set(SIZES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {s.background for s in shape_scenes} == set(BACKGROUNDS)
    counts = Counter(len(s.objects) for s in shape_scenes)
    assert set(counts) == {1, 2, 3} and min(counts.values()) > 0.15 * N_SCENES, counts
    assert {o.texture for o in objects} == {"solid"} and all(s.text is None for s in shape_scenes)


def test_shapes_world_main_subject_is_first_and_of_the_largest_size_class(shape_scenes: list[Scene]) -> None:
    rank = {z: i for i, z in enumerate(SIZES)}
    for s in shape_scenes:
        main, *others = s.objects
        assert main_subject(s) is main
        assert all(rank[o.size] < rank[main.size] for o in others)
        assert not (main.size == "small" and others)  # a small main subject is alone
        assert len({o.position for o in s.objects}) == len(s.objects)  # one object per grid cell
        side = min(s.width, s.height) / 3
        for o in s.objects:
            x0, y0, x1, y1 = o.box
            assert x1 - x0 == y1 - y0 and 0 <= x0 < x1 <= s.width and 0 <= y0 < y1 <= s.height
            row, col = divmod(POSITIONS.index(o.position), 3)
            assert col * s.width / 3 - 1 <= x0 and x1 <= (col + 1) * s.width / 3 + 1  # inside its cell (1 px rounding)
            assert row * s.height / 3 - 1 <= y0 and y1 <= (row + 1) * s.height / 3 + 1
            assert abs((x1 - x0) / side - {"small": 0.50, "medium": 0.72, "large": 0.95}[o.size]) <= 0.02 + 1 / side


def test_shapes_world_images_are_small_and_square(shape_scenes: list[Scene]) -> None:
    assert all(s.width == s.height for s in shape_scenes)
    assert {max(s.width, s.height) for s in shape_scenes} == set(range(96, 161, 16))


def test_shapes_world_dsc_names_the_main_subject_first_and_no_textures(shape_scenes: list[Scene]) -> None:
    rng = np.random.default_rng(5)
    world = WORLDS["shapes"]
    for s in shape_scenes[:300]:
        dsc = descriptive_caption(s, rng, world).lower()
        assert not any(mentions(dsc, t) for t in TEXTURES)
        main = s.objects[0]
        first_shape = min((dsc.find(f" {x}") for o in s.objects for x in (o.shape, plural(o.shape))
                           if f" {x}" in dsc), default=-1)
        assert dsc[first_shape:].lstrip().startswith(main.shape), dsc
        assert shapes_in(dsc) == {o.shape for o in s.objects} and colours_in(dsc) == {o.colour for o in s.objects}
        assert set(POSITION_RE.findall(dsc)) == {o.position for o in s.objects}
