"""Captions of toy scenes: web-like alt-text, the short (SSC) and descriptive (DSC) ground truth.

The SSC names the main subject only; the DSC names every object's size, colour, texture and
position, the count, the background and the written word, in varied sentence templates. The
vocabulary is exactly the names in toy_scenes (COLOURS keys, SHAPES, plurals via ``plural``),
so captions can be parsed back for evaluation. Pure functions; randomness only from ``rng``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from data_pipeline.toy_scenes import COLOURS, SHAPES, WORLDS, Scene, SceneObject, World

ALT_TEXT_PHRASES: tuple[str, ...] = (
    "buy now", "free shipping on all orders", "wall art print", "click to enlarge",
    "abstract background", "image", "product photo", "best seller", "sale",
    "poster for kids room", "home decor", "placeholder", "thumbnail", "limited offer",
)
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four")


def plural(noun: str) -> str:
    """English plural of a shape name ("circle" -> "circles", "cross" -> "crosses")."""
    return noun + "es" if noun.endswith(("s", "x", "ch", "sh")) else noun + "s"


def _with_article(phrase: str) -> str:
    """Prefix "a"/"an" depending on the first letter of ``phrase``."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def main_subject(scene: Scene) -> SceneObject:
    """The object with the largest box area (ties: the first one)."""
    return max(scene.objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))


def short_caption(scene: Scene) -> str:
    """Ground-truth short caption (SSC): the main subject only, deterministic.

    Pattern: "a [small|large] <colour> [striped|dotted] <shape>" ("medium", "solid" omitted).
    """
    o = main_subject(scene)
    words = [o.size * (o.size != "medium"), o.colour, o.texture * (o.texture != "solid"), o.shape]
    return _with_article(" ".join(w for w in words if w))


def _pick(rng: np.random.Generator, options: list[str] | tuple[str, ...]) -> str:
    """Uniformly pick one string from ``options``."""
    return options[int(rng.integers(len(options)))]


_POSITION_FORMS: dict[str, tuple[str, ...]] = {
    "center": ("in the {p}", "at the {p}", "near the {p}", "in the {p} of the image"),
    "corner": ("in the {p}", "at the {p} corner", "towards the {p}", "in the {p} of the image"),
    "tb": ("at the {p}", "along the {p}", "towards the {p}", "near the {p} edge"),
    "lr": ("on the {p}", "towards the {p}", "on the {p} side", "near the {p} edge"),
}


def _position_phrase(position: str, rng: np.random.Generator) -> str:
    """Varied prepositional phrase for a grid position, e.g. "towards the top left"."""
    kind = ("center" if position == "center" else "corner" if " " in position
            else "tb" if position in ("top", "bottom") else "lr")
    return _pick(rng, _POSITION_FORMS[kind]).format(p=position)


def _object_phrase(obj: SceneObject, rng: np.random.Generator, textured: bool = True) -> str:
    """Noun phrase with size, colour, texture ("solid" optional; none in an untextured world) and
    shape, with article."""
    texture = [obj.texture] if textured and (obj.texture != "solid" or rng.random() < 0.3) else []
    if rng.random() < 0.5:
        words = [obj.size, obj.colour, *texture, obj.shape]
    else:
        words = [obj.size, *texture, obj.colour, obj.shape]
    return _with_article(" ".join(words))


def _capitalise(sentence: str) -> str:
    """Capitalise the first letter of ``sentence`` (the rest is left unchanged)."""
    return sentence[0].upper() + sentence[1:]


def _join(items: list[str]) -> str:
    """English list: "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _groups(objects: tuple[SceneObject, ...]) -> str:
    """Group summary like "two red circles and one blue star"."""
    counts = Counter((o.colour, o.shape) for o in objects)  # insertion-ordered
    return _join([f"{NUMBER_WORDS[k]} {c} {plural(s) if k > 1 else s}"
                  for (c, s), k in counts.items()])


def _object_sentence(obj: SceneObject, rng: np.random.Generator, textured: bool = True) -> str:
    """One sentence about one object, with the clause order chosen by ``rng``."""
    noun, where = _object_phrase(obj, rng, textured), _position_phrase(obj.position, rng)
    if rng.random() < 0.5:
        verb = _pick(rng, ["sits", "is placed", "appears", "can be seen"])
        return _capitalise(f"{noun} {verb} {where}.")
    return _capitalise(f"{where}, there is {noun}.")


def descriptive_caption(scene: Scene, rng: np.random.Generator, world: World = WORLDS["full"]) -> str:
    """Ground-truth descriptive caption (DSC) covering every object, the background and word.

    One of five sentence structures is drawn from ``rng``; position and texture phrasing and
    the placement of the word sentence vary too. Objects are named in a random order, or, in a
    grid world, in the scene's order (main subject first, the way a describer starts with what
    stands out); texture words only where the world has textures.
    """
    textured = len(world.textures) > 1
    order = range(len(scene.objects)) if world.grid else rng.permutation(len(scene.objects))
    objs = [scene.objects[i] for i in order]
    n = len(objs)
    count = f"{NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}"
    be = "is" if n == 1 else "are"
    bg = _with_article(scene.background) + " " + _pick(rng, ["background", "backdrop"])
    listed = _join([f"{_object_phrase(o, rng, textured)} {_position_phrase(o.position, rng)}" for o in objs])
    details = [_object_sentence(o, rng, textured) for o in objs]
    style = int(rng.integers(5))
    if style == 0:
        parts = [_capitalise(f"{count} on {bg}: {listed}.")]
    elif style == 1:
        parts = [f"The image shows {count} on {bg}.", *details]
    elif style == 2:
        parts = [f"Against {bg} there {be} {count}.", *details]
    elif style == 3:
        parts = [_capitalise(f"{bg} with {count}: {_groups(tuple(objs))}.")]
        for o in objs:
            tex = f" and {o.texture}" if textured and (o.texture != "solid" or rng.random() < 0.3) else ""
            parts.append(f"The {o.colour} {o.shape} {_position_phrase(o.position, rng)} "
                         f"is {o.size}{tex}.")
    else:
        parts = [_capitalise(f"{listed} {be} arranged on {bg}, {count} in total.")]
    if scene.text is not None:
        w, c = scene.text.word, scene.text.colour
        sentence = _pick(rng, [f'The word "{w}" is written in {c}.',
                               f'There is also the word "{w}" written in {c} letters.',
                               f'Written in {c} is the word "{w}".',
                               f'It also shows the word "{w}" in {c} text.'])
        parts.insert(1 if rng.random() < 0.5 else len(parts), sentence)
    return " ".join(parts)


# ---------------------------------------------------------------- alt text


def _filename(rng: np.random.Generator) -> str:
    """A camera / stock-site style file name, e.g. "IMG_4821.jpg"."""
    a, b = (int(v) for v in rng.integers(0, 10**7, size=2))
    return _pick(rng, [f"IMG_{1000 + a % 9000}.jpg", f"DSC{a % 100000:05d}.JPG",
                       f"image ({1 + a % 30}).png", f"stock-photo-{a}.jpg",
                       f"PXL_2023{101 + a % 1131:04d}_{b % 240000:06d}.jpg"])


def _partial_alt(scene: Scene, rng: np.random.Generator) -> str:
    """True but partial alt text mentioning at most two correct attributes."""
    if scene.text is not None and rng.random() < 0.03:  # rarely, the written word
        return f"the word {scene.text.word}"
    objs = scene.objects
    obj = main_subject(scene) if rng.random() < 0.5 else objs[rng.integers(len(objs))]
    return _pick(rng, [
        obj.shape, plural(obj.shape), f"{obj.colour} {obj.shape}",
        _with_article(f"{obj.colour} {obj.shape} and more"), f"{obj.size} {obj.shape}",
        f"{obj.colour} shape", f"shapes on {_with_article(scene.background)} background",
    ])


def _wrong_alt(scene: Scene, rng: np.random.Generator) -> str:
    """Wrong alt text: a colour and/or shape absent from the scene's objects."""
    used_colours = {o.colour for o in scene.objects}
    if scene.text is not None:
        used_colours.add(scene.text.colour)  # never mention the word's colour
    colours = [c for c in COLOURS if c not in used_colours]
    shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects}]
    colour, shape = _pick(rng, colours), _pick(rng, shapes)
    return _pick(rng, [f"{colour} {shape}", _with_article(shape), f"{colour} {plural(shape)}",
                       _with_article(f"{colour} {shape}"), f"{colour} {shape} clipart"])


def alt_text(scene: Scene, rng: np.random.Generator) -> str:
    """Web-style alt text: ~10% empty, ~15% file name, ~15% shop/unrelated phrase,
    ~45% partially true, ~15% wrong. Never more than two correct attributes."""
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.25:
        return _filename(rng)
    if u < 0.40:
        return _pick(rng, ALT_TEXT_PHRASES)
    if u < 0.85:
        return _partial_alt(scene, rng)
    return _wrong_alt(scene, rng)
