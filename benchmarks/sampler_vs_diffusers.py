"""Our sampler against diffusers' own text-to-image loop: same models, scheduler, noise and guidance.

Ours is ``models.pipeline.RecapPipeline`` (T5 -> xf -> UNet with the token mask and the pooled
caption as ``class_labels``, CFG against the empty caption "" with [uncond; cond] rows). The
peer is diffusers' ``StableDiffusionPipeline.__call__`` given ``prompt_embeds`` and
``negative_prompt_embeds``: diffusers' latent preparation, timestep loop, ``scale_model_input``,
guidance, scheduler step and VAE decode. Its loop passes the UNet neither ``class_labels`` nor
``encoder_attention_mask``, so ``PeerUNet`` (below) supplies the fixed pooled captions and masks
of the [negative; positive] batch it will see; the token embeddings are ours (T5 + xf, padded to
a common length), so both sides run the same computation and any difference is the loop's.

Models: the toy experiment's shapes (t5_tiny, unet=tiny with its xf, vae=tiny), randomly
initialised with a fixed seed: no downloads, no trained weights. Prints the maximum absolute
difference of the final latents and of the decoded images, ms per denoising step of each side (a
step is the time between two consecutive ``scheduler.step`` returns, so text encoding, setup and
decoding are not in it; median over a call's steps, then median over rounds) and the ratio
ours/diffusers. It also prints how far diffusers' pipeline lands when left as it builds itself:
its constructor rewrites the scheduler's ``steps_offset`` (see ``peer_pipeline``), a real
difference between the two loops.

    python benchmarks/sampler_vs_diffusers.py                      # DDIM, 25 steps, 128 px, batch 4
    python benchmarks/sampler_vs_diffusers.py --scheduler dpmpp --steps 20 --rounds 7

On a CPU shared with other jobs, more intra-op threads than free cores makes each UNet call
several times slower and erratic (measured once, toy UNet on 4 rows of 8x8 latents at load average 6
on 2 cores: median 382-425 ms per call with 2 threads, 57 ms with 1), hence ``--threads 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import time
import warnings
from typing import Any

import torch
from diffusers import StableDiffusionPipeline

from data_pipeline.caption_tokenizer import train_caption_tokenizer
from models.diffusion import make_scheduler
from models.pipeline import RecapPipeline, pad_tokens
from models.text_conditioning import build_t5_encoder
from models.vae import build_vae
from train.config.loading import load_experiment
from train.t2i.sampling import sampling_scheduler
from train.t2i.parts import build_denoiser

PROMPTS = ["a large red circle on a white background", "a small blue striped square in the top left",
           "a green star and an orange heart", "the word cat written in purple"]


def toy_components(seed: int = 0) -> dict[str, Any]:
    """RecapPipeline's components at the toy experiment's shapes, random weights from ``seed``;
    ``scheduler`` is the training noise schedule (DDPM)."""
    cfg = load_experiment([])
    words = [w for p in PROMPTS for w in p.split()] + ["on", "the", "left", "right", "a", "an"]
    corpus = [f"{p} {w}" for p in PROMPTS for w in words]
    tokenizer = train_caption_tokenizer(corpus, vocab_size=200, max_tokens=cfg.text_encoder.max_tokens)
    torch.manual_seed(seed)
    t5 = build_t5_encoder(pretrained=None, architecture=dataclasses.asdict(cfg.text_encoder.architecture),
                          vocab_size=len(tokenizer))
    denoiser = build_denoiser(cfg.unet, text_dim=t5.config.d_model, latent_channels=cfg.vae.latent_channels).eval()
    v = cfg.vae
    vae = build_vae(v.block_out_channels, layers_per_block=v.layers_per_block, latent_channels=v.latent_channels,
                    norm_num_groups=v.norm_num_groups).eval()
    d = cfg.diffusion
    noise = make_scheduler(prediction_type=d.prediction_type, beta_schedule=d.beta_schedule,
                           num_train_timesteps=d.num_train_timesteps)
    return dict(tokenizer=tokenizer, text_encoder=t5, caption_transformer=denoiser.caption_transformer,
                unet=denoiser.unet, vae=vae, scheduler=noise)


def our_pipeline(components: dict[str, Any], scheduler: str) -> RecapPipeline:
    """RecapPipeline with a fresh ``ddim``/``dpmpp`` scheduler as `recap sample` builds it."""
    pipe = RecapPipeline(**{**components, "scheduler": sampling_scheduler(scheduler, components["scheduler"].config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


class PeerUNet(torch.nn.Module):
    """The UNet as diffusers' StableDiffusionPipeline calls it (``unet(x, t, encoder_hidden_states=...)``),
    with the pooled captions (``class_labels``) and token masks of the [negative; positive] batch
    that its loop does not pass. Fixed per call: build one per prompt batch."""

    def __init__(self, unet: torch.nn.Module, mask: torch.Tensor, pooled: torch.Tensor) -> None:
        super().__init__()
        self.unet, self.mask, self.pooled = unet, mask, pooled  # (2B, T) bool, (2B, P)

    @property
    def config(self) -> Any:
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        if encoder_hidden_states.shape[0] != self.mask.shape[0]:
            raise ValueError(f"PeerUNet was built for {self.mask.shape[0]} rows, got {encoder_hidden_states.shape[0]}")
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                         encoder_attention_mask=self.mask, class_labels=self.pooled, **kwargs)


def peer_pipeline(ours: RecapPipeline, prompts: list[str], scheduler: str, *, same_scheduler: bool = True
                  ) -> tuple[StableDiffusionPipeline, dict[str, torch.Tensor]]:
    """diffusers' StableDiffusionPipeline over our UNet and VAE, and the ``prompt_embeds`` /
    ``negative_prompt_embeds`` to call it with: our xf tokens of ``prompts`` and of "" (B, T, width),
    padded to a common length exactly as RecapPipeline pads them.

    ``StableDiffusionPipeline.__init__`` rewrites a scheduler config with ``steps_offset != 1`` to
    ``steps_offset=1`` (a deprecation shim for old Stable Diffusion configs). Our schedulers come
    from the training DDPM config, whose ``steps_offset`` is 0, so as built the peer samples other
    timesteps (961, 921, ..., 1 instead of 960, 920, ..., 0 for 25 DDIM steps). ``same_scheduler``
    (default) sets the scheduler again after construction, unmodified, so both loops see the same one.
    """
    tokens, mask, pooled = ours.encode_prompts(prompts)
    empty_tokens, empty_mask, empty_pooled = ours.encode_prompts([""] * len(prompts))
    length = max(tokens.shape[1], empty_tokens.shape[1])
    tokens, mask = pad_tokens(tokens, mask, length)
    empty_tokens, empty_mask = pad_tokens(empty_tokens, empty_mask, length)
    unet = PeerUNet(ours.unet, torch.cat([empty_mask, mask]), torch.cat([empty_pooled, pooled]))
    with warnings.catch_warnings():  # the shim's FutureWarning prints the whole config; reported by main()
        warnings.filterwarnings("ignore", message="(?s).*steps_offset", category=FutureWarning)
        pipe = StableDiffusionPipeline(vae=ours.vae, text_encoder=None, tokenizer=None, unet=unet,
                                       scheduler=sampling_scheduler(scheduler, ours.scheduler.config),
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if same_scheduler:
        pipe.scheduler = sampling_scheduler(scheduler, ours.scheduler.config)  # undo the steps_offset rewrite
    pipe.set_progress_bar_config(disable=True)
    return pipe, {"prompt_embeds": tokens, "negative_prompt_embeds": empty_tokens}


def timed_steps(pipe: Any) -> list[float]:
    """Wrap ``pipe.scheduler.step`` to record the time each step returns; returns the (live) list."""
    stamps: list[float] = []
    step = pipe.scheduler.step

    @functools.wraps(step)  # keeps the signature both pipelines inspect for ``generator``/``eta``
    def stamped(*args: Any, **kwargs: Any) -> Any:
        out = step(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    pipe.scheduler.step = stamped
    return stamps


def sample_both(ours: RecapPipeline, peer: StableDiffusionPipeline, embeds: dict[str, torch.Tensor],
                prompts: list[str], noise: torch.Tensor, *, resolution: int, steps: int, guidance: float,
                output_type: str, peer_first: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ours, diffusers') output from the same initial unit noise (B, C, h, w): final latents
    (``latent``) or images in [0, 1] (``pt``)."""
    common = dict(height=resolution, width=resolution, num_inference_steps=steps, guidance_scale=guidance,
                  output_type=output_type)
    calls = [lambda: ours(prompts, latents=noise.clone(), **common),
             lambda: peer(**embeds, latents=noise.clone(), **common, return_dict=False)[0]]
    if peer_first:
        theirs, mine = calls[1](), calls[0]()
    else:
        mine, theirs = calls[0](), calls[1]()
    return mine, theirs


def per_step_ms(stamps: list[float], steps: int) -> float:
    """Median ms between consecutive step returns of the last call (robust to a busy machine's
    spikes; the time up to the first return holds the call's setup and is left out)."""
    last = stamps[-steps:]
    return 1000 * statistics.median(b - a for a, b in zip(last, last[1:]))


def _span(timesteps: torch.Tensor) -> str:
    t = timesteps.tolist()
    return f"{t[0]}, {t[1]}, ..., {t[-1]}" if len(t) > 2 else ", ".join(map(str, t))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--resolution", type=int, default=128, help="pixels; a multiple of 32 for the toy UNet")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scheduler", choices=["ddim", "dpmpp"], default="ddim")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for both sides (1: stable timings on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.steps < 2 or args.guidance <= 1.0:
        parser.error("--steps must be >= 2 (a step time needs two steps) and --guidance > 1 (diffusers' loop "
                     "guides only above 1)")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    components = toy_components()
    ours = our_pipeline(components, args.scheduler)
    peer, embeds = peer_pipeline(ours, prompts, args.scheduler)
    ours.check_size(args.resolution, args.resolution)
    f = ours.vae_scale_factor
    noise = torch.randn(args.batch, ours.unet.config.in_channels, args.resolution // f, args.resolution // f,
                        generator=torch.Generator().manual_seed(0))
    kwargs = dict(resolution=args.resolution, steps=args.steps, guidance=args.guidance)

    ours_stamps, peer_stamps = timed_steps(ours), timed_steps(peer)
    ours_ms, peer_ms, latent_diff = [], [], 0.0
    for i in range(args.rounds):  # sides interleaved, first one alternating: both see the same machine load
        mine, theirs = sample_both(ours, peer, embeds, prompts, noise, output_type="latent", peer_first=i % 2 == 1,
                                   **kwargs)
        ours_ms.append(per_step_ms(ours_stamps, args.steps))
        peer_ms.append(per_step_ms(peer_stamps, args.steps))
        latent_diff = max(latent_diff, float((mine - theirs).abs().max()))
    images, peer_images = sample_both(ours, peer, embeds, prompts, noise, output_type="pt", **kwargs)
    image_diff = float((images - peer_images).abs().max())
    as_built, _ = peer_pipeline(ours, prompts, args.scheduler, same_scheduler=False)
    shim_latents = as_built(**embeds, height=args.resolution, width=args.resolution, num_inference_steps=args.steps,
                            guidance_scale=args.guidance, latents=noise.clone(), output_type="latent",
                            return_dict=False)[0]
    shim_diff = float((mine - shim_latents).abs().max())

    ours_med, peer_med = statistics.median(ours_ms), statistics.median(peer_ms)
    print(f"RecapPipeline vs diffusers StableDiffusionPipeline: toy models (random init), {args.scheduler}, "
          f"{args.steps} steps, {args.resolution}x{args.resolution} px, batch {args.batch}, guidance {args.guidance}, "
          f"fp32 on {ours.device.type} ({torch.get_num_threads()} threads), median of {args.rounds} rounds")
    print(f"max |ours - diffusers|: final latents {latent_diff:.3e}, decoded images in [0, 1] {image_diff:.3e} "
          f"(latent scale: max |x| = {float(mine.abs().max()):.3g})")
    print(f"  diffusers as StableDiffusionPipeline builds it (scheduler steps_offset rewritten "
          f"{ours.scheduler.config.steps_offset} -> {as_built.scheduler.config.steps_offset}; timesteps "
          f"{_span(as_built.scheduler.timesteps)} vs ours {_span(ours.scheduler.timesteps)}): final latents differ "
          f"by {shim_diff:.3e}")
    print("| side | ms/step | min | max |")
    print("|---|---:|---:|---:|")
    for name, values, med in (("ours (RecapPipeline)", ours_ms, ours_med), ("diffusers", peer_ms, peer_med)):
        print(f"| {name} | {med:.2f} | {min(values):.2f} | {max(values):.2f} |")
    print(f"ratio ours/diffusers (ms/step): {ours_med / peer_med:.3f}")


if __name__ == "__main__":
    main()
