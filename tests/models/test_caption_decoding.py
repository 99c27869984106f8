"""KV-cached CoCa caption decoding against open_clip's own generate and full forward.

The model is a tiny random CoCa whose text_projection is scaled so distributions are not flat,
with EOT and pad columns of larger norm so captions end at varied lengths (greedy choices do
not depend on the global scale; sampling and beam scores do).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import open_clip
import open_clip.coca_model as coca_model
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import CustomResidualAttentionBlock, PatchDropout
from transformers import MinLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper

from models.caption_decoding import (
    DecodingOptions,
    _decode_beams,
    _DecoderState,
    _process_logits,
    content_tokens,
    decode_text,
    generate_tokens,
)

SOT, EOT, PAD = 49406, 49407, 0
TINY_COCA = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 16, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "layers": 2, "heads": 2, "width": 64,
                 "embed_cls": True, "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2,
                       "attn_pooler_heads": 2},
}
LENGTHS = [(12, 3), (30, 5), (40, 10)]  # (max_length, min_length)


def tiny_coca(scale: float = 8.0, end_norm: float = 3.0) -> open_clip.CoCa:
    """Deterministic tiny CoCa; EOT and pad columns have end_norm x the norm of the others."""
    with torch.random.fork_rng():  # seeded init without touching the session's global RNG
        torch.manual_seed(0)
        model = open_clip.CoCa(**TINY_COCA).eval()
        projection = model.text_decoder.text_projection  # open_clip leaves it torch.empty
        ends = torch.Generator().manual_seed(3)  # a draw that gives varied lengths and both endings
        with torch.no_grad():
            torch.nn.init.normal_(projection, std=64 ** -0.5)
            projection.mul_(scale)
            for token in (EOT, PAD):
                projection[:, token] = torch.randn(64, generator=ends) * scale * 64 ** -0.5 * end_norm
    return model


@pytest.fixture(scope="module")
def model() -> open_clip.CoCa:
    return tiny_coca()


@pytest.fixture(scope="module")
def no_pad_model(model: open_clip.CoCa) -> open_clip.CoCa:
    """Pad's logit pinned at 0 (never chosen), EOT more eager: every caption ends by EOT or max_length."""
    quiet = copy.deepcopy(model)
    with torch.no_grad():
        quiet.text_decoder.text_projection[:, PAD] = 0.0
        quiet.text_decoder.text_projection[:, EOT] *= 1.5
    return quiet


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def open_clip_generate():
    """open_clip 3.3 disables generate when transformers lacks BeamSearchScorer (transformers 5).

    Only the two flags generate reads are patched (the transformers names it uses were bound
    before the failing import); reloading open_clip.coca_model would also work but re-creates
    the CoCa class, breaking isinstance checks elsewhere in the session.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coca_model, "_has_transformers", True)
        patch.setitem(coca_model.GENERATION_TYPES, "top_k", TopKLogitsWarper)
        yield


def open_clip_greedy(model, images, max_length: int, min_length: int, **kwargs) -> list[list[int]]:
    with torch.inference_mode():
        rows = model.generate(images, generation_type="top_k", top_k=1, seq_len=max_length,
                              min_seq_len=min_length, **kwargs).tolist()
    return rows


@torch.inference_mode()
def caption_score(model, image: torch.Tensor, content: list[int], max_length: int) -> float:
    """Teacher-forced sum of log-probs (open_clip forward): content, plus the ending token if the
    caption ended by choice (the better of EOT and pad, both end a caption); a forced EOT adds 0."""
    logp = model(image[None], torch.tensor([[SOT, *content]]), output_labels=False)["logits"][0].log_softmax(-1)
    total = sum(logp[i, token].item() for i, token in enumerate(content))
    if len(content) < max_length - 2:
        total += max(logp[len(content), EOT].item(), logp[len(content), PAD].item())
    return total


@torch.inference_mode()
def exhaustive_best_score(model, image: torch.Tensor, max_length: int, lower_bound: float) -> float:
    """Best caption_score over every caption (branch and bound: log-probs are <= 0, so a prefix
    whose sum is not above the best complete score found cannot lead to a better one)."""
    _, image_embs = model._encode_image(image[None])
    ends = torch.zeros(model.text_decoder.text_projection.shape[1], dtype=torch.bool)
    ends[[EOT, PAD]] = True
    best, frontier = lower_bound, [([], 0.0)]
    while frontier:
        prefixes = torch.tensor([[SOT, *content] for content, _ in frontier])
        logp = model(None, prefixes, image_latent=image_embs, image_embs=image_embs.expand(len(frontier), -1, -1),
                     output_labels=False)["logits"][:, -1].log_softmax(-1)
        grown = []
        for (content, total), row in zip(frontier, logp):
            best = max(best, total + row[ends].max().item())
            extended = (total + row).masked_fill(ends, float("-inf"))
            if len(content) + 1 == max_length - 2:  # these end with a forced EOT
                best = max(best, extended.max().item())
                continue
            grown += [(content + [t], extended[t].item()) for t in (extended > best).nonzero().flatten().tolist()]
        frontier = grown
    return best


def repeats(captions: list[list[int]]) -> int:
    return sum(len(c) - len(set(c)) for c in captions)


# --- 1. greedy = open_clip's generate -------------------------------------------------------

@pytest.mark.parametrize("correct_cls_mask", [False, True], ids=["legacy_cls_mask", "correct_cls_mask"])
@pytest.mark.parametrize("max_length,min_length", LENGTHS)
def test_greedy_matches_open_clip_generate(model, images, open_clip_generate, monkeypatch, max_length, min_length,
                                           correct_cls_mask):
    monkeypatch.setattr(model.text, "correct_cls_mask", correct_cls_mask)
    reference = open_clip_greedy(model, images, max_length, min_length)
    ours = generate_tokens(model, images, DecodingOptions(max_length=max_length, min_length=min_length))
    assert ours == [content_tokens(row) for row in reference]
    lengths = [len(caption) for caption in ours]
    assert len(set(lengths)) >= 3, lengths  # not vacuous: ended early by choice and by max_length
    assert min(lengths) < max_length - 2 == max(lengths)


def test_a_generated_pad_ends_the_caption_like_open_clip(model, images, open_clip_generate):
    reference = open_clip_greedy(model, images, 40, 10)
    ended_by_pad = [row for row in reference if row[len(content_tokens(row)) + 1] == PAD]
    assert ended_by_pad and len(content_tokens(ended_by_pad[0])) < 10 - 1  # pad is not held back by min_length
    assert generate_tokens(model, images, DecodingOptions(max_length=40, min_length=10)) == [
        content_tokens(row) for row in reference]


def test_repetition_penalty_matches_open_clip_and_cuts_repeats(model, images, open_clip_generate):
    options = DecodingOptions(max_length=30, min_length=5, repetition_penalty=1.3)
    reference = open_clip_greedy(model, images, 30, 5, repetition_penalty=1.3)
    penalised = generate_tokens(model, images, options)
    assert penalised == [content_tokens(row) for row in reference]
    plain = generate_tokens(model, images, DecodingOptions(max_length=30, min_length=5))
    assert repeats(penalised) < repeats(plain)


# --- 2. cached steps = open_clip's full forward, pad tokens in the prefix -------------------

def test_step_logits_match_full_forward_with_pads_in_the_prefix(model, images, monkeypatch):
    generator = torch.Generator().manual_seed(5)
    prefix = torch.randint(1, 49406, (6, 9), generator=generator)
    prefix[:, 0] = SOT
    for row, pads in enumerate([[], [2], [1, 5], [3, 4, 5], [8], [1, 3, 5, 7]]):
        prefix[row, pads] = PAD
    by_mode = {}
    for correct in (False, True):
        monkeypatch.setattr(model.text, "correct_cls_mask", correct)
        with torch.inference_mode():
            reference = model(images, prefix, output_labels=False)["logits"]  # (6, 9, V)
            state = _DecoderState(model, model._encode_image(images)[1], capacity=9)
            ours = torch.stack([state.step(prefix[:, t]) for t in range(9)], dim=1)
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)
        by_mode[correct] = reference
    # the two CLS-mask modes really differ after a pad, and only there
    differs = (by_mode[False] - by_mode[True]).abs().amax(-1) > 1e-3  # (6, 9)
    assert not differs[0].any() and differs[1:, -1].all()


# --- 3. sampling ----------------------------------------------------------------------------

def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, images):
    options = DecodingOptions(strategy="sample", max_length=20, min_length=3, seed=3)
    torch.manual_seed(0)
    first = generate_tokens(model, images, options)
    torch.manual_seed(1)
    rng = torch.get_rng_state()
    second = generate_tokens(model, images, options)
    assert torch.equal(torch.get_rng_state(), rng)
    assert first == second
    assert generate_tokens(model, images, dataclasses.replace(options, seed=4)) != first
    assert first != generate_tokens(model, images, DecodingOptions(max_length=20, min_length=3))


@pytest.mark.parametrize("knobs", [{"top_k": 1}, {"top_p": 1e-6}, {"top_k": 1, "temperature": 3.0}])
def test_sampling_from_one_token_is_greedy(model, images, knobs):
    greedy = generate_tokens(model, images, DecodingOptions(max_length=20, min_length=3))
    assert generate_tokens(model, images, DecodingOptions(strategy="sample", max_length=20, min_length=3,
                                                          **knobs)) == greedy


@torch.inference_mode()
def first_token_logits(model, image: torch.Tensor) -> torch.Tensor:
    state = _DecoderState(model, model._encode_image(image[None])[1], capacity=1)
    return state.step(torch.tensor([SOT]))[0]  # (V,)


def first_tokens(model, image, n: int, **knobs) -> torch.Tensor:
    """n sampled first tokens for one image; EOT/pad show up as -1."""
    captions = generate_tokens(model, image[None].expand(n, -1, -1, -1),
                               DecodingOptions(strategy="sample", max_length=3, min_length=0, **knobs))
    return torch.tensor([caption[0] if caption else -1 for caption in captions])


def test_temperature_scales_the_sampled_distribution(model, images):
    logits, n = first_token_logits(model, images[5]), 300
    top, expected = int(logits.argmax()), []
    for temperature in (0.5, 1.0, 2.0):
        p = logits.div(temperature).softmax(-1)[top].item()
        observed = (first_tokens(model, images[5], n, temperature=temperature, seed=11) == top).float().mean().item()
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / n) + 0.01, (temperature, observed, p)
        expected.append(p)
    assert expected[0] > expected[1] + 0.1 and expected[1] > expected[2] + 0.1  # the check can tell them apart


def test_top_k_and_top_p_keep_exactly_the_head(model, images):
    logits = first_token_logits(model, images[5]) / 2.0
    as_drawn = lambda tokens: {-1 if t in (EOT, PAD) else t for t in tokens}  # noqa: E731
    drawn = set(first_tokens(model, images[5], 200, temperature=2.0, top_k=3, seed=1).tolist())
    assert drawn == as_drawn(logits.topk(3).indices.tolist())
    probs, order = logits.softmax(-1).sort(descending=True)
    nucleus = as_drawn(order[: int((probs.cumsum(0) < 0.8).sum()) + 1].tolist())  # smallest head with mass >= 0.8
    drawn = set(first_tokens(model, images[5], 200, temperature=2.0, top_p=0.8, seed=1).tolist())
    assert drawn <= nucleus and len(drawn) >= 2


# --- 4. beam search -------------------------------------------------------------------------

@pytest.mark.parametrize("max_length,min_length", LENGTHS)
def test_beam_search_with_one_beam_is_greedy(model, images, max_length, min_length):
    options = DecodingOptions(max_length=max_length, min_length=min_length)
    beam = DecodingOptions(strategy="beam", num_beams=1, length_penalty=0.0, max_length=max_length,
                           min_length=min_length)
    assert generate_tokens(model, images, beam) == generate_tokens(model, images, options)


@pytest.mark.parametrize("max_length", [5, 6, 8])
def test_beam_search_finds_the_exhaustive_optimum(model, images, max_length):
    greedy = generate_tokens(model, images, DecodingOptions(max_length=max_length, min_length=0))
    beam = generate_tokens(model, images, DecodingOptions(strategy="beam", num_beams=4, length_penalty=0.0,
                                                          max_length=max_length, min_length=0))
    greedy_scores = [caption_score(model, i, c, max_length) for i, c in zip(images, greedy)]
    beam_scores = [caption_score(model, i, c, max_length) for i, c in zip(images, beam)]
    best = [exhaustive_best_score(model, i, max_length, s) for i, s in zip(images, beam_scores)]
    assert beam_scores == pytest.approx(best, abs=1e-4)
    assert all(b >= g - 1e-4 for b, g in zip(beam_scores, greedy_scores))
    assert any(g < b - 1e-3 for b, g in zip(beam_scores, greedy_scores))  # greedy is not already optimal


def test_beam_search_beats_greedy_on_long_captions(model, images):
    greedy = generate_tokens(model, images, DecodingOptions(max_length=30, min_length=0))
    beam = generate_tokens(model, images, DecodingOptions(strategy="beam", num_beams=4, length_penalty=0.0,
                                                          max_length=30, min_length=0))
    gains = [caption_score(model, i, b, 30) - caption_score(model, i, g, 30) for i, b, g in zip(images, beam, greedy)]
    assert min(gains) >= -1e-4 and max(gains) > 1e-3


M_CONTENT, M_EOT, M_PAD, M_SOT = 4, 4, 5, 6  # a 6-token vocabulary; SOT is only ever fed


class MarkovState:
    """Stands in for _DecoderState: next-token logits depend only on the last token, read from a
    table (rows: last token, SOT last; columns: M_CONTENT content tokens, then M_EOT and M_PAD)."""

    def __init__(self, table: torch.Tensor, rows: int):
        self.table, self.last, self.device = table, torch.full((rows,), M_SOT), torch.device("cpu")

    @property
    def rows(self) -> int:
        return len(self.last)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.last = tokens
        return self.table[tokens].clone()

    def select(self, rows: torch.Tensor) -> None:
        self.last = self.last[rows]


def markov_beam(table: torch.Tensor, max_length: int, num_beams: int, length_penalty: float) -> list[int]:
    options = DecodingOptions(strategy="beam", max_length=max_length, min_length=0, num_beams=num_beams,
                              length_penalty=length_penalty)
    return _decode_beams(MarkovState(table, 1), options, M_SOT, M_EOT, M_PAD)[0]


def markov_optimum(table: torch.Tensor, max_length: int, length_penalty: float) -> tuple[float, list[int]]:
    """Brute force over every caption: (best score, its tokens)."""
    logp = table.log_softmax(-1)
    best = (float("-inf"), [])
    for n in range(max_length - 1):
        for content in itertools.product(range(M_CONTENT), repeat=n):
            path = (M_SOT, *content)
            total = sum(logp[a, b].item() for a, b in zip(path, path[1:]))
            if n < max_length - 2:  # ended by choice; otherwise a forced EOT adds nothing
                total += logp[path[-1], [M_EOT, M_PAD]].max().item()
            best = max(best, (total / (n + 1) ** length_penalty, list(content)))
    return best


def markov_table(probabilities: dict[int, dict[int, float]]) -> torch.Tensor:
    """Log-probability table from {last: {next: p}}; unlisted rows are uniform, unlisted entries ~0."""
    table = torch.zeros(M_SOT + 1, M_CONTENT + 2)
    for last, row in probabilities.items():
        table[last] = -30.0
        for token, p in row.items():
            table[last, token] = math.log(p)
    return table


def test_beam_search_waits_for_a_longer_caption_that_length_penalty_favours():
    # SOT -> EOT (0.55) beats SOT -> 0 (0.22), but 0 1 2 EOT is near-certain after that:
    # score / length: [] -> log(.55)/1 = -0.60; [0, 1, 2] -> log(.22)/4 = -0.38 (lp = 1)
    table = markov_table({M_SOT: {M_EOT: 0.55, 0: 0.22, 1: 0.2, 2: 0.03}, 0: {1: 1.0}, 1: {2: 1.0}, 2: {M_EOT: 1.0}})
    assert markov_beam(table, max_length=8, num_beams=1, length_penalty=1.0) == [0, 1, 2]
    assert markov_beam(table, max_length=8, num_beams=1, length_penalty=0.0) == []  # sums favour []
    assert markov_optimum(table, 8, 1.0)[1] == [0, 1, 2] and markov_optimum(table, 8, 0.0)[1] == []


def test_beam_search_keeps_the_best_continuing_beams_past_an_ending():
    # EOT ranks first, so with 2 beams both continuing beams [0] and [1] must stay live:
    # [1, 3] scores log(.2)/3 = -0.54, better than [] (-0.69) and [0, *] (log(.3 * .5)/3 = -0.63)
    table = markov_table({M_SOT: {M_EOT: 0.5, 0: 0.3, 1: 0.2}, 0: {2: 0.5, 3: 0.5}, 1: {3: 1.0},
                          2: {M_EOT: 1.0}, 3: {M_EOT: 1.0}})
    assert markov_beam(table, max_length=8, num_beams=2, length_penalty=1.0) == [1, 3]
    assert markov_optimum(table, 8, 1.0)[1] == [1, 3]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("max_length", [5, 6])
def test_beam_search_with_enough_beams_is_exhaustive(max_length, length_penalty):
    # every candidate of every step ranks within num_beams, so nothing is pruned
    beams = (M_CONTENT + 2) * M_CONTENT ** (max_length - 3)
    generator = torch.Generator().manual_seed(max_length)
    for _ in range(5):
        table = torch.randn(M_SOT + 1, M_CONTENT + 2, generator=generator) * 2
        best_score, _ = markov_optimum(table, max_length, length_penalty)
        found = markov_beam(table, max_length, beams, length_penalty)
        logp, path = table.log_softmax(-1), (M_SOT, *found)
        total = sum(logp[a, b].item() for a, b in zip(path, path[1:]))
        if len(found) < max_length - 2:
            total += logp[path[-1], [M_EOT, M_PAD]].max().item()
        assert total / (len(found) + 1) ** length_penalty == pytest.approx(best_score, abs=1e-5)


def test_length_penalty_favours_longer_captions(no_pad_model, images):
    def lengths(penalty: float) -> list[int]:
        options = DecodingOptions(strategy="beam", num_beams=4, length_penalty=penalty, max_length=20, min_length=0)
        return [len(caption) for caption in generate_tokens(no_pad_model, images, options)]
    short, long = lengths(0.0), lengths(2.0)
    assert all(s <= n for s, n in zip(short, long)) and sum(long) > sum(short)


# --- 5. length controls and repetition ------------------------------------------------------

STRATEGIES = [{"strategy": "greedy"}, {"strategy": "sample", "seed": 2}, {"strategy": "beam", "num_beams": 3}]


@pytest.mark.parametrize("length,penalty", [(3, 1.7), (5, 0.6), (7, 1.0)])
def test_logit_processing_matches_the_transformers_processors(length, penalty):
    generator = torch.Generator().manual_seed(length)
    logits = torch.randn(4, 50, generator=generator) * 3  # both signs, so both penalty branches run
    history = torch.randint(0, 50, (4, 8), generator=generator)
    seen = history[:, :length]
    expected = RepetitionPenaltyLogitsProcessor(penalty)(seen, MinLengthLogitsProcessor(5, 49)(seen, logits.clone()))
    options = DecodingOptions(min_length=5, repetition_penalty=penalty)
    torch.testing.assert_close(_process_logits(logits.clone(), history, length, options, eot_id=49), expected)
    assert (expected[:, 49] == float("-inf")).all() == (length < 5)


@pytest.mark.parametrize("knobs", STRATEGIES, ids=lambda k: k["strategy"])
def test_max_length_counts_sot_and_eot(no_pad_model, images, knobs):
    free = generate_tokens(no_pad_model, images, DecodingOptions(max_length=9, min_length=0, **knobs))
    assert max(len(c) for c in free) <= 7
    full = generate_tokens(no_pad_model, images, DecodingOptions(max_length=9, min_length=8, **knobs))
    assert [len(c) for c in full] == [7] * 6
    assert generate_tokens(no_pad_model, images, DecodingOptions(max_length=2, min_length=1, **knobs)) == [[]] * 6


@pytest.mark.parametrize("min_length", [0, 4, 8])
def test_min_length_holds_eot_back_exactly_until_allowed(no_pad_model, images, min_length):
    many = images.repeat(10, 1, 1, 1)
    sampled = generate_tokens(no_pad_model, many, DecodingOptions(strategy="sample", temperature=1.5,
                                                                  max_length=20, min_length=min_length, seed=0))
    assert min(len(c) for c in sampled) == max(min_length - 1, 0)  # EOT as soon as allowed, never before
    for knobs in STRATEGIES[::2]:
        decoded = generate_tokens(no_pad_model, images, DecodingOptions(max_length=20, min_length=min_length, **knobs))
        assert min(len(c) for c in decoded) >= min_length - 1


def test_repetition_penalty_cuts_repeats_for_every_strategy(model, images):
    for knobs in STRATEGIES:
        plain = generate_tokens(model, images, DecodingOptions(max_length=30, min_length=29, **knobs))
        penalised = generate_tokens(model, images, DecodingOptions(max_length=30, min_length=29,
                                                                   repetition_penalty=2.0, **knobs))
        assert repeats(penalised) < repeats(plain), knobs


# --- 6. batches of captions of different lengths --------------------------------------------

@pytest.mark.parametrize("knobs", [{"strategy": "greedy"}, {"strategy": "beam", "num_beams": 3}],
                         ids=["greedy", "beam"])
def test_a_batch_decodes_like_one_image_at_a_time(model, images, monkeypatch, knobs):
    options = DecodingOptions(max_length=40, min_length=0, length_penalty=0.0, **knobs)
    shrinks = []
    select = _DecoderState.select

    def spying_select(self, rows):
        shrinks.append(len(rows) < self.rows)
        select(self, rows)

    monkeypatch.setattr(_DecoderState, "select", spying_select)
    batch = generate_tokens(model, images, options)
    assert any(shrinks)  # finished rows were dropped mid-way
    assert batch == [generate_tokens(model, image[None], options)[0] for image in images]
    assert len({len(c) for c in batch}) >= 3


def test_decoding_uses_eval_mode_and_restores_training(model, images):
    options = DecodingOptions(max_length=12, min_length=3)
    expected = generate_tokens(model, images, options)
    training = copy.deepcopy(model).train()
    training.visual.patch_dropout = PatchDropout(0.5)  # would drop half the image tokens in train mode
    assert generate_tokens(training, images, options) == expected
    assert training.training and training.visual.training


# --- 7. errors and helpers ------------------------------------------------------------------

@pytest.mark.parametrize("field,kwargs", [
    ("strategy", {"strategy": "nucleus"}),
    ("max_length", {"max_length": 1, "min_length": 0}),
    ("max_length", {"max_length": 5, "min_length": 5}),
    ("min_length", {"min_length": -1}),
    ("temperature", {"temperature": 0.0}),
    ("top_k", {"top_k": -1}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("num_beams", {"num_beams": 0}),
    ("length_penalty", {"length_penalty": float("nan")}),
    ("seed", {"seed": -1}),
])
def test_bad_options_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"DecodingOptions\.{field}="):
        DecodingOptions(**kwargs).validate()


def test_max_length_beyond_the_context_is_rejected(model, images):
    with pytest.raises(ValueError, match="max_length=77 exceeds the model's context length \\(76\\)"):
        generate_tokens(model, images, DecodingOptions(max_length=77))
    assert len(generate_tokens(model, images[:1], DecodingOptions(max_length=76, min_length=75))[0]) == 74


def test_unsupported_towers_raise_not_implemented(model, images):
    custom = copy.deepcopy(model)
    custom.text_decoder.resblocks[1] = CustomResidualAttentionBlock(64, 2)
    with pytest.raises(NotImplementedError, match="CustomResidualAttentionBlock"):
        generate_tokens(custom, images, DecodingOptions())
    custom.text = torch.nn.Identity()  # stands in for an HF text tower
    with pytest.raises(NotImplementedError, match="text tower Identity"):
        generate_tokens(custom, images, DecodingOptions())


def test_decode_text_strips_special_tokens():
    tokenizer = SimpleTokenizer(context_length=76)
    ids = tokenizer.encode("a photo of a cat")
    assert decode_text([SOT, *ids, EOT], tokenizer) == "a photo of a cat"
    assert content_tokens([SOT, *ids, EOT, 0, 0]) == ids and content_tokens([SOT, 5, PAD, 7]) == [5]
