"""The toy VAE's pieces: downsampling by 2**(levels - 1), PSNR, the reconstruction losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.vae import build_vae, downsampling_factor, encode_pixels, object_weights, psnr_db, reconstruct, vae_loss


@pytest.mark.parametrize(("blocks", "factor"), [([8, 8], 2), ([8, 16, 16], 4), ([8, 16, 16, 16], 8)])
def test_latents_are_the_image_over_the_factor(blocks: list[int], factor: int) -> None:
    torch.manual_seed(0)
    vae = build_vae(blocks, layers_per_block=1, latent_channels=3, norm_num_groups=8).eval()
    pixels = torch.randint(0, 256, (2, 3, 32, 48), dtype=torch.uint8)
    assert downsampling_factor(vae) == factor
    assert encode_pixels(vae, pixels).shape == (2, 3, 32 // factor, 48 // factor)
    images = pixels.float() / 127.5 - 1.0
    out = reconstruct(vae, images)
    assert out.shape == images.shape and out.min() >= -1.0 and out.max() <= 1.0


def test_psnr_db_per_image() -> None:
    images = torch.zeros(3, 3, 4, 4)
    # in [0, 1] units the errors are 0.1 (MSE 1e-2: 20 dB) and 0.01 (MSE 1e-4: 40 dB); the last is exact
    reconstructions = torch.stack([torch.full((3, 4, 4), 0.2), torch.full((3, 4, 4), -0.02), torch.zeros(3, 4, 4)])
    torch.testing.assert_close(psnr_db(images, reconstructions), torch.tensor([20.0, 40.0, 100.0]))
    half = images.clone()
    half[1, :, :2] = 1.0  # half the pixels off by 0.5 in [0, 1] units: MSE 0.125 -> 9.03 dB
    assert psnr_db(images, half)[1].item() == pytest.approx(10 * torch.log10(torch.tensor(8.0)).item())
    with pytest.raises(ValueError, match="differ"):
        psnr_db(images, images[:, :, :2])


def test_vae_loss_is_the_chosen_reconstruction_error_plus_weighted_kl() -> None:
    torch.manual_seed(0)
    vae = build_vae([8, 16], layers_per_block=1, latent_channels=2, norm_num_groups=8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1

    def by_hand(error):  # the same posterior sample: reseed before each call
        torch.manual_seed(5)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().sum() / posterior.mean.numel()
        return error(recon, images), kl

    for name, error in (("l1", F.l1_loss), ("mse", F.mse_loss)):
        expected, kl = by_hand(error)
        torch.manual_seed(5)
        got = vae_loss(vae, images, kl_weight=0.5, reconstruction=name)
        torch.testing.assert_close(got, expected + 0.5 * kl)
    l1, _ = by_hand(F.l1_loss)
    mse, _ = by_hand(F.mse_loss)
    assert not torch.isclose(l1, mse)  # the two options really differ
    with pytest.raises(ValueError, match="'l1' or 'mse'"):
        vae_loss(vae, images, kl_weight=0.0, reconstruction="l2")  # type: ignore[arg-type]


def test_decoding_the_posterior_mean_is_deterministic_and_draws_no_random_numbers() -> None:
    torch.manual_seed(0)
    vae = build_vae([8, 16], layers_per_block=1, latent_channels=2, norm_num_groups=8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    posterior = vae.encode(images).latent_dist
    kl = posterior.kl().sum() / posterior.mean.numel()
    expected = F.mse_loss(vae.decode(posterior.mean).sample, images) + 0.5 * kl
    torch.manual_seed(1)
    got = vae_loss(vae, images, kl_weight=0.5, reconstruction="mse", sample_posterior=False)
    after = torch.rand(1)
    torch.manual_seed(1)
    assert torch.equal(after, torch.rand(1))  # the global RNG did not move
    torch.testing.assert_close(got, expected)
    sampled = vae_loss(vae, images, kl_weight=0.5, reconstruction="mse")  # a posterior sample: another value
    assert not torch.isclose(sampled, got)


def test_object_weights_favour_pixels_far_from_the_median_colour() -> None:
    images = torch.full((2, 3, 4, 4), 0.8)  # a pale background...
    images[0, :, 0, 0] = torch.tensor([1.0, -1.0, -1.0])  # ...with one red pixel in the first image
    weights = object_weights(images, 4.0)
    assert weights.shape == (2, 1, 4, 4)
    torch.testing.assert_close(weights.mean(dim=(2, 3)), torch.ones(2, 1))  # mean 1 per image
    distance = torch.tensor([0.2, 1.8, 1.8]).norm().item()  # the red pixel's distance from the median (0.8, 0.8, 0.8)
    background = 16 / (15 + 1 + 4 * distance)  # weight 1 before normalising, 1 + 4 * distance for the red pixel
    assert weights[0, 0, 0, 0].item() == pytest.approx(background * (1 + 4 * distance), rel=1e-5)
    assert weights[0, 0, 3, 3].item() == pytest.approx(background, rel=1e-5)
    torch.testing.assert_close(weights[1], torch.ones(1, 4, 4))  # a plain image: uniform weights
    torch.testing.assert_close(object_weights(images, 0.0), torch.ones(2, 1, 4, 4))


def test_vae_loss_with_object_weight_is_the_weighted_mean_error() -> None:
    torch.manual_seed(0)
    vae = build_vae([8, 16], layers_per_block=1, latent_channels=2, norm_num_groups=8)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    recon = vae.decode(vae.encode(images).latent_dist.mode()).sample
    expected = ((recon - images).square() * object_weights(images, 3.0)).mean()
    got = vae_loss(vae, images, kl_weight=0.0, reconstruction="mse", sample_posterior=False, object_weight=3.0)
    torch.testing.assert_close(got, expected)
    plain = vae_loss(vae, images, kl_weight=0.0, reconstruction="mse", sample_posterior=False)
    assert not torch.isclose(got, plain)  # the weights change the loss
