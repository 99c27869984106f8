"""Caption mix: seeded per-sample draws at the configured ratio, fallbacks, realised ratios."""

from __future__ import annotations

import pytest

from data_pipeline.caption_mix import CaptionMix, MixCounter, caption_member

RECIPE = CaptionMix({"dsc": 0.95, "txt": 0.05}, fallback=("dsc", "txt"))


def test_draws_follow_the_weights_and_the_seed() -> None:
    draws = [RECIPE.draw(seed) for seed in range(20000)]
    assert abs(draws.count("txt") / len(draws) - 0.05) < 0.006  # binomial sd 0.0015
    assert draws == [RECIPE.draw(seed) for seed in range(20000)]  # a pure function of the seed
    three = CaptionMix({"dsc": 0.5, "ssc": 0.3, "txt": 0.2}, fallback=("dsc",))
    counts = [three.draw(s) for s in range(30000)]
    for key, p in {"dsc": 0.5, "ssc": 0.3, "txt": 0.2}.items():
        assert abs(counts.count(key) / len(counts) - p) < 0.015


def test_zero_and_one_weights_are_exact() -> None:
    only_dsc = CaptionMix({"dsc": 1.0, "txt": 0.0}, fallback=("txt",))
    assert {only_dsc.draw(s) for s in range(2000)} == {"dsc"}
    only_alt = CaptionMix({"dsc": 0.0, "txt": 1.0}, fallback=())
    assert {only_alt.draw(s) for s in range(2000)} == {"txt"}


def test_missing_or_blank_captions_fall_back_in_order() -> None:
    seed = next(s for s in range(100) if RECIPE.draw(s) == "dsc")
    assert RECIPE.choose({"dsc": "a red circle", "txt": "circle"}, seed) == ("dsc", "dsc", "a red circle")
    assert RECIPE.choose({"dsc": "  ", "txt": "circle"}, seed) == ("dsc", "txt", "circle")
    assert RECIPE.choose({"txt": "circle"}, seed) == ("dsc", "txt", "circle")
    assert RECIPE.choose({"dsc": "", "txt": None}, seed) is None


def test_counter_reports_realised_ratios() -> None:
    counter = MixCounter()
    for seed in range(1000):
        counter.add(RECIPE.choose({"dsc": "d" if seed % 10 else "", "txt": "t"}, seed))
    counter.add(None)
    ratios = counter.ratios()
    assert sum(counter.used.values()) == 1000 and counter.dropped == 1
    assert ratios["caption_mix/dsc"] + ratios["caption_mix/txt"] == pytest.approx(1.0)
    assert ratios["caption_mix/fallback"] == pytest.approx(counter.fell_back / 1001)
    assert 0.08 < ratios["caption_mix/fallback"] < 0.12  # every 10th dsc is empty
    assert ratios["caption_mix/dropped"] == pytest.approx(1 / 1001)


def test_bad_mixes_are_refused() -> None:
    with pytest.raises(ValueError, match="positive sum"):
        CaptionMix({"dsc": 0.0, "txt": 0.0}, fallback=())
    with pytest.raises(ValueError, match=">= 0"):
        CaptionMix({"dsc": 1.1, "txt": -0.1}, fallback=())
    with pytest.raises(ValueError, match=r"fallback key\(s\) \['ssc'\] have no weight"):
        CaptionMix({"dsc": 1.0}, fallback=("ssc",))


def test_caption_members() -> None:
    assert (caption_member("txt"), caption_member("dsc"), caption_member("ssc")) == ("txt", "dsc.txt", "ssc.txt")
