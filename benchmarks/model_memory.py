"""Production model sizes and a static per-GPU memory estimate of training them, DDP vs ZeRO-1/2/3.

Every model is built on the meta device (``with torch.device("meta")``): shapes and parameter
counts without allocating a byte, so this runs on a laptop.

- xf + UNet: the project's own builder (``train.t2i_parts.build_denoiser``) on the ``unet`` and
  ``vae`` sections that ``experiment=dalle3_256`` composes (conf/unet/dalle3_0p9b.yaml).
- T5-XXL encoder: ``google/t5-v1_1-xxl``'s published shape (d_model 4096, d_ff 10240, d_kv 64,
  64 heads, 24 layers, vocabulary 32128, gated-GELU) through ``models.text_conditioning.build_t5_encoder``.
- SD VAE: ``models.vae.build_vae`` with conf/vae/sd.yaml's shape (AutoencoderKL 128/256/512/512,
  2 layers per block, 4 latent channels).

Memory per GPU of the trained states (xf + UNet), the usual mixed-precision accounting (ZeRO
paper, Rajbhandari et al. 2020, section 3.1): bf16 weights 2 B + bf16 gradients 2 B + fp32 master
weights and Adam moments 12 B per parameter, plus this trainer's EMA, an fp32 copy of the whole
model on every rank (train/training/ema.py ``EmaWeights``) = 4 B. ZeRO-1 shards the 12 B, ZeRO-2 also
the gradients, ZeRO-3 also the weights, over N GPUs. Trained from raw images, the frozen T5 and VAE
are whole on every rank; from a cache (train_t2i.cache), neither is on any GPU but the VAE's decoder
(decoder + post_quant_conv) on the rank that draws sample grids (benchmarks/t2i_cache_memory.py
measures it). A static estimate: activations,
DDP gradient buckets, DeepSpeed communication buffers, the CUDA context and allocator
fragmentation are NOT included.

    python benchmarks/model_memory.py               # N = the GPUs of dalle3_256 and dalle3_1024
    python benchmarks/model_memory.py --gpus 8 16 64
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from models.text_conditioning import build_t5_encoder
from models.vae import build_vae
from train.config.loading import load_experiment
from train.t2i.parts import build_denoiser

PRESETS = ("dalle3_256", "dalle3_1024")
# google/t5-v1_1-xxl's config.json (encoder half); feed_forward_proj gated-gelu is build_t5_encoder's.
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24}
T5_XXL_VOCAB = 32128
GIB = 2**30
# bytes per trained parameter (see the module docstring)
WEIGHTS, GRADS, OPTIMIZER, EMA = 2, 2, 12, 4


@dataclass(frozen=True)
class Counts:
    xf: int
    unet: int
    t5: int
    vae: int
    vae_decoder: int  # decoder + post_quant_conv: what train-t2i from a cache loads, on one rank

    @property
    def trained(self) -> int:
        return self.xf + self.unet


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_parameters(preset: str = PRESETS[0]) -> Counts:
    """Parameter counts of the preset's xf + UNet, T5-XXL's encoder and its VAE, built on meta."""
    cfg = load_experiment([f"experiment={preset}"])
    with torch.device("meta"):
        denoiser = build_denoiser(cfg.unet, text_dim=T5_XXL["d_model"], latent_channels=cfg.vae.latent_channels)
        t5 = build_t5_encoder(pretrained=None, architecture=T5_XXL, vocab_size=T5_XXL_VOCAB)
        vae = build_vae(cfg.vae.block_out_channels, layers_per_block=cfg.vae.layers_per_block,
                        latent_channels=cfg.vae.latent_channels, norm_num_groups=cfg.vae.norm_num_groups)
    assert all(p.is_meta for p in denoiser.parameters()), "the builder allocated real weights"
    decoder = _numel(vae.decoder) + (_numel(vae.post_quant_conv) if vae.post_quant_conv is not None else 0)
    return Counts(xf=_numel(denoiser.caption_transformer), unet=_numel(denoiser.unet), t5=_numel(t5), vae=_numel(vae),
                  vae_decoder=decoder)


def per_gpu_bytes(params: int, gpus: int, zero_stage: int) -> dict[str, float]:
    """Bytes per GPU of weights, gradients, optimizer states and EMA; zero_stage 0 is DDP."""
    shard = 1.0 / gpus
    return {
        "weights": WEIGHTS * params * (shard if zero_stage >= 3 else 1.0),
        "grads": GRADS * params * (shard if zero_stage >= 2 else 1.0),
        "optimizer": OPTIMIZER * params * (shard if zero_stage >= 1 else 1.0),
        "ema": EMA * params,
    }


def memory_table(counts: Counts, gpus: int) -> list[str]:
    frozen = {"bf16": 2 * (counts.t5 + counts.vae), "fp32": 4 * (counts.t5 + counts.vae)}
    head = (f"{'runtime':<8} {'weights':>8} {'grads':>8} {'master+Adam':>12} {'EMA':>8} {'states':>8} "
            f"{'vs DDP':>7} {'+frozen bf16':>13} {'+frozen fp32':>13} {'cache rank 0':>13}")
    lines = [head, "-" * len(head)]
    ddp_total = sum(per_gpu_bytes(counts.trained, gpus, 0).values())
    for name, stage in (("DDP", 0), ("ZeRO-1", 1), ("ZeRO-2", 2), ("ZeRO-3", 3)):
        b = per_gpu_bytes(counts.trained, gpus, stage)
        total = sum(b.values())
        lines.append(f"{name:<8} {b['weights'] / GIB:>8.2f} {b['grads'] / GIB:>8.2f} {b['optimizer'] / GIB:>12.2f} "
                     f"{b['ema'] / GIB:>8.2f} {total / GIB:>8.2f} {total / ddp_total:>7.3f} "
                     f"{(total + frozen['bf16']) / GIB:>13.2f} {(total + frozen['fp32']) / GIB:>13.2f} "
                     f"{(total + 4 * counts.vae_decoder) / GIB:>13.2f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, nargs="+", help="GPU counts (default: those of dalle3_256 and dalle3_1024)")
    args = parser.parse_args()
    worlds = {p: (lambda c: c.launcher.nproc_per_node * c.launcher.nnodes)(load_experiment([f"experiment={p}"]))
              for p in PRESETS}
    gpu_counts = args.gpus or sorted(set(worlds.values()))
    counts = count_parameters(PRESETS[0])

    print("Parameters (built on the meta device, nothing allocated)")
    for label, n in (("xf (CaptionTransformer, unet=dalle3_0p9b)", counts.xf),
                     ("UNet2DConditionModel (unet=dalle3_0p9b)", counts.unet),
                     ("trained: xf + UNet", counts.trained),
                     ("frozen: T5-XXL encoder (t5-v1_1-xxl shape)", counts.t5),
                     ("frozen: SD VAE (vae=sd, AutoencoderKL)", counts.vae),
                     ("  of which the decoder (+ post_quant_conv)", counts.vae_decoder)):
        print(f"  {label:<45} {n:>15,}  ({n / 1e9:.3f} B)")
    print()
    print(f"Static per-GPU memory in GiB: bytes/param weights {WEIGHTS} (bf16) + grads {GRADS} (bf16) + "
          f"master+Adam {OPTIMIZER} (fp32) + EMA {EMA} (fp32, whole on every rank);")
    print("From raw images: + frozen T5-XXL + VAE whole on every rank, in the dtype their checkpoints load in (bf16 or "
          "fp32).")
    print("From a cache: states only; the rank drawing sample grids adds the VAE's decoder (fp32): 'cache rank 0'.")
    print("EXCLUDES activations, DDP gradient buckets, DeepSpeed buffers, CUDA context, fragmentation.")
    for gpus in gpu_counts:
        presets = ", ".join(f"{p}: {w}" for p, w in worlds.items() if w == gpus)
        print()
        print(f"N = {gpus} GPUs" + (f" ({presets})" if presets else ""))
        for line in memory_table(counts, gpus):
            print(line)


if __name__ == "__main__":
    main()
