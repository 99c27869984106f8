"""T5 encoder + xf stage: shapes, frozen T5, and padding that never leaks into the outputs."""

from __future__ import annotations

import pytest
import torch

from models.text_conditioning import CaptionTransformer, build_t5_encoder, encode_captions
from tests.helpers import assert_close_to_scale

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4}


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    return build_t5_encoder(pretrained=None, architecture=TINY_T5, vocab_size=100)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[5, 6, 7, 1, 0, 0], [8, 9, 10, 11, 12, 1]])
    return ids, ids != 0


def test_t5_is_frozen_and_masks_padding(t5) -> None:
    assert not any(p.requires_grad for p in t5.parameters()) and not t5.training
    ids, mask = _batch()
    states = encode_captions(t5, ids, mask)
    assert states.shape == (2, 6, 32)
    assert (states[0, 4:] == 0).all()
    other_pad = ids.clone()
    other_pad[0, 4:] = 42  # other tokens under the mask: the real positions must not change
    assert torch.allclose(encode_captions(t5, other_pad, mask)[0, :4], states[0, :4], atol=1e-6)


def test_xf_outputs_ignore_padding_and_train(t5) -> None:
    torch.manual_seed(1)
    xf = CaptionTransformer(text_dim=32, width=16, layers=2, heads=4, pooled_dim=24)
    ids, mask = _batch()
    states = encode_captions(t5, ids, mask)
    tokens, pooled = xf(states, mask)
    assert tokens.shape == (2, 6, 16) and pooled.shape == (2, 24)
    assert (tokens[0, 4:] == 0).all()
    noisy = states.clone()
    noisy[0, 4:] = torch.randn(2, 32)  # garbage where the mask is off
    tokens2, pooled2 = xf(noisy, mask)
    assert torch.allclose(tokens2, tokens, atol=1e-6) and torch.allclose(pooled2, pooled, atol=1e-6)
    alone, alone_pooled = xf(states[:1, :4], mask[:1, :4])  # the same caption without padding
    assert_close_to_scale(alone[0], tokens[0, :4], msg="tokens")
    assert_close_to_scale(alone_pooled[0], pooled[0], msg="pooled")
    (tokens.square().mean() + pooled.square().mean()).backward()
    assert all(p.grad is not None for p in xf.parameters())


def test_bad_inputs() -> None:
    xf = CaptionTransformer(text_dim=8, width=8, layers=1, heads=2, pooled_dim=8)
    with pytest.raises(ValueError, match="at least one unmasked token"):
        xf(torch.zeros(2, 3, 8), torch.tensor([[True, False, False], [False, False, False]]))
    with pytest.raises(ValueError, match="exactly one of pretrained"):
        build_t5_encoder(pretrained=None, architecture=None)
    with pytest.raises(ValueError, match="vocab_size"):
        build_t5_encoder(pretrained=None, architecture=TINY_T5)


def test_a_saved_t5_loads_from_its_folder_offline(t5, tmp_path) -> None:
    t5.save_pretrained(tmp_path / "t5")
    again = build_t5_encoder(pretrained=str(tmp_path / "t5"), architecture=None)
    ids, mask = _batch()
    assert torch.equal(encode_captions(again, ids, mask), encode_captions(t5, ids, mask))
