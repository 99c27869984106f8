"""The diffusion objective: schedules, targets, min-SNR weights, the loss, CFG dropout."""

from __future__ import annotations

import pytest
import torch

from models.diffusion import (
    drop_captions, dropout_draws, loss_weights, make_scheduler, noised_and_target, snr, weighted_mse,
)


def _sched(kind: str = "epsilon", schedule: str = "linear"):
    return make_scheduler(prediction_type=kind, beta_schedule=schedule, num_train_timesteps=1000)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 8, 16, generator=g), torch.randn(3, 4, 8, 16, generator=g), torch.tensor([0, 499, 999])


def test_schedules_are_diffusers_ddpm() -> None:
    linear, cosine = _sched(), _sched(schedule="squaredcos_cap_v2")
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    for s in (linear, cosine):
        a = s.alphas_cumprod
        assert (a[1:] < a[:-1]).all() and 0 < a[-1] < a[0] < 1
    assert cosine.alphas_cumprod[500] > linear.alphas_cumprod[500]  # cosine keeps more signal mid-way


def test_epsilon_target_is_the_noise_and_v_recovers_x0() -> None:
    latents, noise, t = _data()
    noisy, target = noised_and_target(_sched(), latents, noise, t)
    a = _sched().alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(target, noise)
    assert torch.allclose(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, atol=1e-6)
    v_sched = _sched("v_prediction", "squaredcos_cap_v2")
    noisy_v, v = noised_and_target(v_sched, latents, noise, t)
    a = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(a.sqrt() * noisy_v - (1 - a).sqrt() * v, latents, atol=1e-5)  # x0 = sqrt(a) x_t - sqrt(1-a) v
    with pytest.raises(ValueError, match="epsilon or v_prediction"):
        noised_and_target(_sched("sample"), latents, noise, t)


def test_min_snr_weights() -> None:
    sched, t = _sched(), torch.tensor([0, 100, 500, 999])
    ratio = snr(sched, t)
    assert (ratio[1:] < ratio[:-1]).all()
    assert torch.equal(loss_weights(sched, t, None), torch.ones(4))
    eps = loss_weights(sched, t, 5.0)
    assert torch.allclose(eps, torch.clamp(ratio, max=5.0) / ratio)
    assert eps[0] < 1 and eps[-1] == pytest.approx(1.0)  # high SNR down-weighted, low SNR untouched
    v = loss_weights(_sched("v_prediction"), t, 5.0)
    assert torch.allclose(v, torch.clamp(ratio, max=5.0) / (ratio + 1))


def test_weighted_mse_by_hand() -> None:
    pred, target = torch.zeros(2, 1, 2, 2), torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[2.0, 0.0], [0.0, 0.0]]]])
    assert weighted_mse(pred, target, torch.tensor([1.0, 0.5])).item() == pytest.approx((1.0 + 0.5 * 1.0) / 2)


def test_drop_captions_replaces_exactly_the_dropped_rows() -> None:
    states, mask = torch.randn(3, 6, 4), torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1] * 6]).bool()
    empty_states, empty_mask = torch.randn(1, 4), torch.tensor([True])  # "" -> just </s>
    out_s, out_m = drop_captions(states, mask, torch.tensor([False, True, False]), empty_states, empty_mask)
    assert torch.equal(out_s[0], states[0]) and torch.equal(out_s[2], states[2])
    assert torch.equal(out_s[1, 0], empty_states[0]) and (out_s[1, 1:] == 0).all()
    assert out_m[1].tolist() == [True, False, False, False, False, False] and torch.equal(out_m[0], mask[0])
    with pytest.raises(ValueError, match="empty caption has 7 tokens"):
        drop_captions(states, mask, torch.tensor([True, True, True]), torch.randn(7, 4), torch.ones(7, dtype=torch.bool))


def test_dropout_draws_follow_the_seeds_and_the_rate() -> None:
    seeds = torch.arange(4000, dtype=torch.int64) * 7919
    draws = dropout_draws(seeds, 0.1)
    assert torch.equal(draws, dropout_draws(seeds, 0.1))
    assert abs(draws.float().mean().item() - 0.1) < 0.015
    assert not dropout_draws(seeds[:100], 0.0).any() and dropout_draws(seeds[:100], 1.0).all()
