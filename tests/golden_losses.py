"""Golden per-step losses of the three toy trainers: the guard against accidental numeric changes.

`python -m tests.golden_losses [--threads N] [--out FILE]` runs a few steps of toy `train-vae`,
`pretrain-captioner` and `train-t2i` (one process, fixed seed, N compute threads, tiny models, in
a temporary directory) and prints {stage: [loss per step]} as JSON. `--record` writes the result
to tests/assets/golden_losses.json (re-record only in a commit that says why the numbers moved).

tests/train/test_golden_losses.py compares a fresh run with the recorded values at a relative
tolerance that holds on any x86 CPU; a run before and after a refactor on one machine must give
bit-identical lists (compare the printed JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ASSET = Path(__file__).resolve().parent / "assets" / "golden_losses.json"
STEPS = 4
_QUIET = ["logger.wandb.mode=disabled", "logger.progress=false", "data.reader.num_workers=1",
          "checkpoint.every_steps=1000"]
# The models and learning rates are pinned here rather than taken from the toy experiment's defaults:
# the guard is for the trainers' code; retuning the toy world must not move it.
_VAE = ["vae.block_out_channels=[32,64,64,64]", "vae.layers_per_block=1", "vae.latent_channels=4",
        "vae.norm_num_groups=16", "train_vae.resolution=64", "train_vae.optimizer.lr=2e-3",
        "train_vae.reconstruction_loss=l1", "train_vae.sample_posterior=true", "train_vae.optimizer.schedule=constant"]
_COCA = ["captioner.architecture={embed_dim: 96, vision_cfg: {image_size: 96, layers: 1, width: 96, patch_size: 12, "
         "head_width: 32, attentional_pool: true, attn_pooler_heads: 4, attn_pooler_queries: 32, output_tokens: true}, "
         "text_cfg: {context_length: 76, vocab_size: 49408, layers: 1, heads: 4, width: 96, embed_cls: true, "
         "output_tokens: true}, multimodal_cfg: {context_length: 76, vocab_size: 49408, width: 96, heads: 4, layers: 1, "
         "attn_pooler_heads: 4}}", "captioner.fitted_vocab_size=null", "pretrain_captioner.optimizer.lr=1e-3"]


def _losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def run_all(root: Path) -> dict[str, list[float]]:
    """Train each stage STEPS steps under ``root``; returns the logged losses per stage."""
    from data_pipeline.options import ToyDataOptions
    from data_pipeline.toy_shards import write_toy_dataset
    from tests.helpers import run_stage, t2i_inputs

    data = root / "toy_data"
    options = ToyDataOptions(train_shards=2, heldout_shards=1, samples_per_shard=32, seed=11, processes=1,
                             world="full", text_probability=0.4)
    write_toy_dataset({"train": data / "train", "heldout": data / "heldout"}, options, progress=False)
    common = [f"run.root={root / 'runs'}", f"data.train={data}/train", f"data.heldout={data}/heldout", "seed=3",
              *_QUIET]
    out: dict[str, list[float]] = {}

    run_stage("train_vae", [*common, *_VAE, f"train_vae.steps={STEPS}", "train_vae.global_batch_size=8",
                            "train_vae.micro_batch_size=8", "train_vae.optimizer.warmup_steps=2"])
    out["train_vae"] = _losses(root / "runs" / "toy" / "train_vae")

    run_stage("pretrain_captioner", [*common, f"pretrain_captioner.steps={STEPS}",
                                     "pretrain_captioner.global_batch_size=8", "pretrain_captioner.micro_batch_size=8",
                                     "pretrain_captioner.optimizer.warmup_steps=2", *_COCA])
    out["pretrain_captioner"] = _losses(root / "runs" / "toy" / "pretrain_captioner")

    inputs = t2i_inputs(data, root / "t2i_inputs")
    stages = f"[{{resolution: 64, steps: {STEPS}, global_batch_size: 4, micro_batch_size: 4}}]"
    run_stage("train_t2i", [*common, "train_t2i.cache=null", f"train_t2i.input={inputs['shards']}",
                            f"train_t2i.vae={inputs['vae']}", f"text_encoder.tokenizer={inputs['tokenizer']}",
                            "text_encoder.max_tokens=24",
                            "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
                            "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32",
                            "unet.xf_heads=4", f"train_t2i.stages={stages}", "train_t2i.sampling.every_steps=null",
                            "train_t2i.optimizer.warmup_steps=2", "train_t2i.optimizer.lr=1e-3",
                            "train_t2i.ema_decay=null", "diffusion=eps_linear"])
    out["train_t2i"] = _losses(root / "runs" / "toy" / "train_t2i")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (default 1)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--record", action="store_true", help=f"write the result to {ASSET}")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        losses = run_all(Path(tmp))
    text = json.dumps(losses, indent=1) + "\n"
    sys.stdout.write(text)
    for path in [args.out] if args.out else []:
        path.write_text(text)
    if args.record:
        ASSET.parent.mkdir(parents=True, exist_ok=True)
        ASSET.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
