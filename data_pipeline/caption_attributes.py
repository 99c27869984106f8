"""Caption quality: which scene attributes a caption states, scored against the ground truth.

``recap evaluate-captioner`` scores caption sources (web alt-text, SSC and DSC captioners) on
held-out toy scenes by the precision and recall of the *facts* they state. A caption is parsed
into sets of facts per attribute (``parse_caption``); the scene's ground-truth dict gives the
expected sets (``ground_truth_facts``); set overlap gives the counts. Pure: no IO, no torch.

Vocabulary is exactly toy_scenes' names (COLOURS keys, SHAPES and their ``plural``, SIZES,
TEXTURES, POSITIONS), matched as whole words, case-insensitively; punctuation separates
sentences and noun phrases. Facts per attribute (caption side / ground-truth side):

- ``colour``: every colour name in the text / the objects' colours plus the written word's
  colour (the word's ink is a colour in the picture).
- ``shape``: every shape name, singular or plural / the objects' shapes.
- ``colour_shape``: ``(colour, shape)`` for a colour inside a shape's noun phrase, i.e. the
  shape preceded by a run of colour/size/texture/number words ("a large red striped circle",
  "two red circles"); "red and blue circles" binds only blue / the objects' pairs.
- ``texture``: "striped", "dotted" and "solid" mentions / the non-solid textures present.
  "solid" is optional in the DSC, so it never counts in ``expected``; a "solid" mention is
  correct iff some object is solid (``Mentions.also_true``), and wrong otherwise.
- ``size``: ``(size, shape)`` for a size word in a shape's noun phrase, or in the DSC's
  predicate "the red circle [position phrase] is small" / the objects' pairs. A size word
  bound to no shape is the fact ``(size, None)``: counted as mentioned, never correct.
- ``position``: ``(position, shape)``; positions match longest first ("top left" before
  "top"). A position binds to the shape just before it, across the DSC's verbs and
  prepositions ("a red circle sits towards the top left"), else to the noun phrase after
  it ("towards the top left, there is a red circle"). Unbound: ``(position, None)``, wrong.
- ``count``: the total stated as "<number> shape(s)|object(s)" (number word or digits);
  "two red circles" is a group, not the total / ``{len(objects)}``.
- ``word``: a quoted string ("apple"), or the token after an unquoted "the word" /
  the written word, if any. Quoted text is never parsed for other attributes.

Scores are micro-averaged set overlaps summed over captions: ``mentioned`` = stated facts,
``correct`` = stated facts that are true, ``recalled`` = expected facts stated, ``expected``
= ground-truth facts. Precision = correct / mentioned, recall = recalled / expected, and
0.0 when the denominator is 0 (stating nothing earns nothing; the counts tell the two apart).
An empty caption states nothing: it adds only to ``expected``.

Two text-only measures sit beside the scores: ``distinct`` (how many different non-empty captions a
source wrote: a captioner that ignores the image writes one) and ``stutters`` (captions where a word
comes back within the next two words of a clause: "striped striped", "a pink star pink star",
"a brown cross brown"; no caption of the toy world's own templates does).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from data_pipeline.toy_captions import NUMBER_WORDS, plural
from data_pipeline.toy_scenes import COLOURS, POSITIONS, SHAPES, SIZES, TEXTURES

ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "colour_shape", "texture", "size", "position",
                               "count", "word")

Token = tuple[str, object]  # (kind, value); kinds: colour shape size texture number position
#                              count_noun quote punct word

_NUMBERS: tuple[str, ...] = (*NUMBER_WORDS, "five", "six", "seven", "eight", "nine", "ten")
_LEXICON: dict[str, Token] = {
    **{c: ("colour", c) for c in COLOURS},
    **{s: ("shape", s) for s in SHAPES}, **{plural(s): ("shape", s) for s in SHAPES},
    **{z: ("size", z) for z in SIZES}, **{t: ("texture", t) for t in TEXTURES},
    **{n: ("number", i) for i, n in enumerate(_NUMBERS)},
    **{n: ("count_noun", n) for n in ("shape", "shapes", "object", "objects")},
}
_POSITION_SYNONYMS = {"centre": "center"}
_QUOTES = "\"\u201c\u201d"  # straight and curly double quotes
_TOKEN_RE = re.compile(rf"[{_QUOTES}]([^{_QUOTES}]*)[{_QUOTES}]|([a-z]+)|(\d+)|([.,;:!?()])")
_MODIFIERS = frozenset({"colour", "size", "texture", "number"})  # noun-phrase adjectives
# Words allowed between a shape and a following position ("sits towards the"), both ways.
_POSITION_LEAD = frozenset({"the", "in", "at", "near", "towards", "toward", "along", "on", "sits",
                            "sit", "is", "are", "placed", "appears", "appear", "can", "be", "seen",
                            "located", "lies", "lie"})
_POSITION_TAIL = frozenset({"corner", "side", "edge", "of", "the", "image", "picture"})
_FRONTED = frozenset({",", "there", "is", "are", "a", "an"}) | _POSITION_TAIL
_PREPOSITIONS = frozenset({"in", "at", "near", "towards", "toward", "along", "on", "the"})
_NOT_A_WORD = frozenset({"is", "was", "written", "in", "on", "and", "the", "a", "an", "that",
                         "which", "with", "of"})


@dataclass(frozen=True)
class Mentions:
    """Facts per attribute (every ATTRIBUTES key present).

    ``also_true`` holds facts that are true but not required (only ground truth sets it:
    texture "solid" when a solid object exists); they count as correct, never as expected.
    """
    facts: dict[str, frozenset]
    also_true: dict[str, frozenset] = field(default_factory=dict)


# ------------------------------------------------------------------ parsing


def _tokenize(text: str) -> list[Token]:
    """Lower-cased tokens; multi-word positions merged ("top", "left" -> "top left")."""
    raw: list[Token] = []
    for quote, word, digits, punct in _TOKEN_RE.findall(text.lower()):
        if word:
            word = _POSITION_SYNONYMS.get(word, word)
            raw.append(_LEXICON.get(word, ("word", word)))
        elif digits:
            raw.append(("number", int(digits)))
        elif punct:
            raw.append(("punct", punct))
        else:
            raw.append(("quote", quote.strip(" \t\n.,;:!?'")))
    tokens: list[Token] = []
    i = 0
    while i < len(raw):
        pair = (f"{raw[i][1]} {raw[i + 1][1]}"
                if i + 1 < len(raw) and raw[i][0] == raw[i + 1][0] == "word" else "")
        if pair in POSITIONS:
            tokens.append(("position", pair))
            i += 2
            continue
        is_position = raw[i][0] == "word" and raw[i][1] in POSITIONS
        tokens.append(("position", raw[i][1]) if is_position else raw[i])
        i += 1
    return tokens


def _text(tok: Token) -> object:
    """The surface word of a plain word or punctuation token, else None."""
    return tok[1] if tok[0] in ("word", "punct") else None


def _modifiers(tokens: list[Token], i: int) -> list[int]:
    """Indices of the adjective run (colour/size/texture/number) right before shape ``i``."""
    j = i - 1
    while j >= 0 and tokens[j][0] in _MODIFIERS:
        j -= 1
    return list(range(j + 1, i))


def _predicate_size(tokens: list[Token], i: int) -> int | None:
    """Index of the size in "<shape> [position phrase] is|are <size>", else None."""
    j = i + 1
    while j < len(tokens) and (tokens[j][0] == "position" or _text(tokens[j]) in _POSITION_TAIL
                               or _text(tokens[j]) in _PREPOSITIONS):
        j += 1
    if j + 1 < len(tokens) and _text(tokens[j]) in ("is", "are") and tokens[j + 1][0] == "size":
        return j + 1
    return None


def _position_subject(tokens: list[Token], i: int) -> str | None:
    """Shape the position at ``i`` describes: the one before it, else the fronted one after."""
    j = i - 1
    while j >= 0 and _text(tokens[j]) in _POSITION_LEAD:
        j -= 1
    if j >= 0 and tokens[j][0] == "shape":
        return str(tokens[j][1])
    j = i + 1
    while j < len(tokens) and (_text(tokens[j]) in _FRONTED or tokens[j][0] in _MODIFIERS):
        j += 1
    if j < len(tokens) and tokens[j][0] == "shape":
        return str(tokens[j][1])
    return None


def parse_caption(text: str) -> Mentions:
    """Facts a caption states, per attribute (see the module docstring for definitions)."""
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    tokens = _tokenize(text)
    facts: dict[str, set] = {a: set() for a in ATTRIBUTES}
    bound_sizes: set[int] = set()
    for i, (kind, value) in enumerate(tokens):
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ("punct", ".")
        if kind in ("colour", "texture"):
            facts[kind].add(value)
        elif kind == "shape":
            facts["shape"].add(value)
            for j in _modifiers(tokens, i):
                if tokens[j][0] == "colour":
                    facts["colour_shape"].add((tokens[j][1], value))
                elif tokens[j][0] == "size":
                    facts["size"].add((tokens[j][1], value))
                    bound_sizes.add(j)
            j = _predicate_size(tokens, i)
            if j is not None:
                facts["size"].add((tokens[j][1], value))
                bound_sizes.add(j)
        elif kind == "position":
            facts["position"].add((value, _position_subject(tokens, i)))
        elif kind == "number" and nxt[0] == "count_noun":
            facts["count"].add(value)
        elif kind == "quote" and value:
            facts["word"].add(value)
        elif (kind, value) == ("word", "word") and nxt[0] != "quote":
            if isinstance(nxt[1], str) and nxt[0] != "punct" and nxt[1] not in _NOT_A_WORD:
                facts["word"].add(nxt[1])
    facts["size"] |= {(v, None) for j, (k, v) in enumerate(tokens)
                      if k == "size" and j not in bound_sizes}
    return Mentions({a: frozenset(f) for a, f in facts.items()})


def ground_truth_facts(gt: dict) -> Mentions:
    """Expected facts of a scene from its ``scene_ground_truth`` dict (as stored in shard json).

    Raises ValueError if ``gt`` lacks "objects" or an object lacks an attribute key.
    """
    if not isinstance(gt, dict) or not isinstance(gt.get("objects"), list):
        raise ValueError("gt must be a scene_ground_truth dict with an 'objects' list")
    try:
        objs = [(o["shape"], o["colour"], o["size"], o["texture"], o["position"])
                for o in gt["objects"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"gt object lacks {err}; expected keys shape, colour, size, texture, "
                         "position (see toy_scenes.scene_ground_truth)") from err
    text = gt.get("text")
    facts = {
        "colour": {c for _, c, _, _, _ in objs} | ({text["colour"]} if text else set()),
        "shape": {s for s, _, _, _, _ in objs},
        "colour_shape": {(c, s) for s, c, _, _, _ in objs},
        "texture": {t for _, _, _, t, _ in objs if t != "solid"},
        "size": {(z, s) for s, _, z, _, _ in objs},
        "position": {(p, s) for s, _, _, _, p in objs},
        "count": {len(objs)},
        "word": {text["word"].lower()} if text else set(),
    }
    solid = frozenset({"solid"}) if any(t == "solid" for _, _, _, t, _ in objs) else frozenset()
    return Mentions({a: frozenset(f) for a, f in facts.items()}, {"texture": solid})


# ------------------------------------------------------------------ scoring


@dataclass
class AttributeScore:
    """Micro-averaged fact counts for one attribute (see the module docstring)."""
    mentioned: int = 0  # facts stated
    correct: int = 0    # stated facts that are true (precision numerator)
    recalled: int = 0   # expected facts that were stated (recall numerator)
    expected: int = 0   # ground-truth facts

    @property
    def precision(self) -> float:
        """correct / mentioned; 0.0 when nothing was mentioned."""
        return self.correct / self.mentioned if self.mentioned else 0.0

    @property
    def recall(self) -> float:
        """recalled / expected; 0.0 when nothing was expected."""
        return self.recalled / self.expected if self.expected else 0.0

    def __add__(self, other: AttributeScore) -> AttributeScore:
        return AttributeScore(self.mentioned + other.mentioned, self.correct + other.correct,
                              self.recalled + other.recalled, self.expected + other.expected)

    def as_dict(self) -> dict[str, float | int]:
        """Precision, recall and the four counts, JSON-serialisable."""
        return {"precision": self.precision, "recall": self.recall, "mentioned": self.mentioned,
                "correct": self.correct, "recalled": self.recalled, "expected": self.expected}


def compare(said: Mentions, truth: Mentions) -> dict[str, AttributeScore]:
    """Per-attribute counts of one caption's facts against one scene's facts."""
    scores = {}
    for a in ATTRIBUTES:
        stated, expected = said.facts[a], truth.facts[a]
        true = expected | truth.also_true.get(a, frozenset())
        scores[a] = AttributeScore(len(stated), len(stated & true), len(stated & expected),
                                   len(expected))
    return scores


def score_caption(caption: str, gt: dict) -> dict[str, AttributeScore]:
    """Per-attribute counts of ``caption`` against the scene ground truth ``gt``."""
    return compare(parse_caption(caption), ground_truth_facts(gt))


def stutters(caption: str) -> bool:
    """True if a word of ``caption`` comes back within the next two words of the same clause
    (case ignored; punctuation ends a clause, so "one shape: one red circle" is fine):
    "striped striped", "a pink star pink star", "a brown cross brown"."""
    for clause in re.split(r"[.,:;!?]", caption.lower()):
        words = re.findall(r"[a-z0-9']+", clause)
        if any(word in words[i + 1:i + 3] for i, word in enumerate(words)):
            return True
    return False


class CaptionScorer:
    """Accumulates scores over many captions of ONE source (e.g. all DSC captioner outputs)."""

    def __init__(self) -> None:
        self._scores = {a: AttributeScore() for a in ATTRIBUTES}
        self._captions = 0
        self._words = 0
        self._empty = 0
        self._texts: set[str] = set()
        self._stutters = 0

    def add(self, caption: str, gt: dict) -> None:
        """Score one caption against its scene's ground-truth dict and accumulate."""
        for a, s in score_caption(caption, gt).items():
            self._scores[a] = self._scores[a] + s
        self._captions += 1
        self._words += len(caption.split())
        self._empty += not caption.strip()
        if caption.strip():
            self._texts.add(" ".join(caption.lower().split()))
        self._stutters += stutters(caption)

    def summary(self) -> dict:
        """Totals: caption count, mean words, empties, distinct non-empty captions (case and
        spacing ignored), stuttering captions, per-attribute and overall P/R.

        "overall" micro-averages over all attributes (facts summed across attributes).
        """
        total = sum(self._scores.values(), AttributeScore())
        return {"captions": self._captions,
                "mean_words": self._words / self._captions if self._captions else 0.0,
                "empty": self._empty,
                "distinct": len(self._texts),
                "stutters": self._stutters,
                "per_attribute": {a: s.as_dict() for a, s in self._scores.items()},
                "overall": total.as_dict()}


def score_captions(captions: Iterable[str], gts: Iterable[dict]) -> dict:
    """Summary (as ``CaptionScorer.summary``) of paired captions and ground truths."""
    scorer = CaptionScorer()
    captions, gts = list(captions), list(gts)
    if len(captions) != len(gts):
        raise ValueError(f"{len(captions)} captions but {len(gts)} ground truths; pair them 1:1")
    for caption, gt in zip(captions, gts):
        scorer.add(caption, gt)
    return scorer.summary()


def _cell(stats: dict) -> str:
    """"P 0.93 / R 0.88"; a "-" where the denominator is 0 (nothing mentioned/expected)."""
    p = f"{stats['precision']:.2f}" if stats["mentioned"] else "  - "
    r = f"{stats['recall']:.2f}" if stats["expected"] else "  - "
    return f"P {p} / R {r}"


def score_table(results: dict[str, dict]) -> str:
    """Fixed-width table: one column per source (summary dicts), rows attributes, overall,
    (if every summary has "other_image", the same against another image's ground truth),
    mean words, empty, distinct and stuttering captions."""
    if not results:
        raise ValueError("score_table needs at least one source: {name: CaptionScorer.summary()}")
    rows: list[tuple[str, list[str]]] = [
        (a, [_cell(r["per_attribute"][a]) for r in results.values()]) for a in ATTRIBUTES]
    rows.append(("overall", [_cell(r["overall"]) for r in results.values()]))
    if all("other_image" in r for r in results.values()):  # the control: scored against another image
        rows.append(("vs other image", [_cell(r["other_image"]) for r in results.values()]))
    rows.append(("mean words", [f"{r['mean_words']:.1f}" for r in results.values()]))
    rows.append(("empty", [f"{r['empty']} / {r['captions']}" for r in results.values()]))
    rows.append(("distinct", [f"{r['distinct']} / {r['captions']}" for r in results.values()]))
    rows.append(("stutters", [f"{r['stutters']} / {r['captions']}" for r in results.values()]))
    label_w = max(len(label) for label, _ in rows)
    col_w = max(len(c) for c in [*results, *(c for _, cells in rows for c in cells)])
    lines = [" " * label_w + "".join(f"  {name:>{col_w}}" for name in results)]
    lines.append("-" * len(lines[0]))
    lines += [f"{label:<{label_w}}" + "".join(f"  {c:>{col_w}}" for c in cells)
              for label, cells in rows]
    return "\n".join(lines)
