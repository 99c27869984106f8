"""Helpers shared by tests: running the `recap` CLI in subprocesses, reading metrics, tiny models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

    from data_pipeline.toy_scenes import Scene

REPO = Path(__file__).resolve().parent.parent
# A CoCa small enough for unit tests (open_clip model config; vocabulary and context are open_clip's).
TINY_COCA = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16,
                   "attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 8, "output_tokens": True},
    "text_cfg": {"context_length": 76, "vocab_size": 49408, "layers": 1, "heads": 2, "width": 32, "embed_cls": True,
                 "output_tokens": True},
    "multimodal_cfg": {"context_length": 76, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                       "attn_pooler_heads": 2},
}


def run_recap(args: list[str], env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run the `recap` CLI in a subprocess from the repository root; returns the completed process.

    A failpoint that signals its process group (``RECAP_FAULT=...group=1``) gets a session of its
    own, so that the signal reaches the CLI and its workers but not pytest."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout, start_new_session="group=1" in full_env.get("RECAP_FAULT", ""))


# Run first in a script for `run_without_recap`: importing this repository's packages fails, as for a
# user with only the libraries (the venv's editable install would find them from any directory).
RECAP_PACKAGES = ("models", "train", "data_pipeline", "launch")
BLOCK_RECAP = f"""
import importlib.abc, sys
class _NoRecap(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {RECAP_PACKAGES!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: only the libraries are installed)")
sys.meta_path.insert(0, _NoRecap())
for _name in {RECAP_PACKAGES!r}:
    try:
        __import__(_name)
    except ModuleNotFoundError:
        continue
    sys.exit(f"{{_name}} is importable")
"""


def run_without_recap(script: str, args: list[str], cwd: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -c BLOCK_RECAP + script *args`` in ``cwd`` (not the repository), without PYTHONPATH,
    offline, with Hugging Face's caches (diffusers' copies of custom code) under ``cwd``/hf."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HF_MODULES_CACHE")}
    env.update(HF_HOME=str(cwd / "hf"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", BLOCK_RECAP + script, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def logged_losses(run_dir: Path) -> dict[int, list[float]]:
    """step -> every loss logged for it in metrics.jsonl (a replayed step appears twice)."""
    out: dict[int, list[float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out.setdefault(record["step"], []).append(record["loss"])
    return out


def write_captioned_shards(src: Path, out: Path) -> Path:
    """Toy shards in the layout `recap recaption` writes, captions from ground truth (tests of the
    diffusion side need captions, not captioner quality)."""
    from data_pipeline.toy_shards import write_ground_truth_captions

    return write_ground_truth_captions(src, out)


def toy_tokenizer(max_tokens: int = 64):
    """A T5-style tokenizer trained on a small caption-like corpus (seconds)."""
    from data_pipeline.caption_tokenizer import train_caption_tokenizer

    colours, shapes = ["red", "blue", "green", "orange", "purple"], ["circle", "square", "cross", "star", "heart"]
    corpus = [f"a large striped {c} {s} in the top left on a beige background" for c in colours for s in shapes]
    return train_caption_tokenizer(corpus * 4, vocab_size=200, max_tokens=max_tokens)


def run_stage(stage: str, overrides: list[str]) -> dict:
    """Run a stage in this process (as `recap STAGE overrides` would, without the launcher and its
    interpreter start-up); returns its summary. ``stage`` is the module name: ``train_vae``."""
    import importlib

    from train.config.loading import load_experiment

    cfg = load_experiment(overrides)
    return importlib.import_module(f"train.stages.{stage}").run(cfg, cfg.run.dir / stage)


def t2i_inputs(toy_data: Path, root: Path) -> dict[str, Path]:
    """What the stages before train-t2i give, built fast: recaptioned-layout shards (ground-truth
    captions), a toy tokenizer and a random VAE folder, under ``root``."""
    import torch

    from data_pipeline.caption_tokenizer import save_tokenizer
    from models.vae import build_vae

    shards = write_captioned_shards(toy_data / "train", root / "captioned")
    tokenizer = save_tokenizer(toy_tokenizer(24), root / "tokenizer")
    torch.manual_seed(0)
    build_vae([8, 16, 16, 16], layers_per_block=1, norm_num_groups=8).save_pretrained(root / "vae")
    return {"shards": shards, "tokenizer": tokenizer, "vae": root / "vae"}


def one_object_scene(colour: str, shape: str, rng: np.random.Generator, size: int = 32) -> Scene:
    """A toy scene (data_pipeline.toy_scenes.Scene) of ``size`` x ``size`` px: one large solid
    ``colour`` ``shape`` (a side of 55-75% of the image) at a place drawn from ``rng`` on white.
    For learning tests that need one attribute to vary and little else."""
    from data_pipeline.toy_scenes import Scene, SceneObject, grid_position

    side = int(rng.integers(round(0.55 * size), round(0.75 * size) + 1))
    x0, y0 = (int(v) for v in rng.integers(1, size - side, size=2))
    box = (x0, y0, x0 + side, y0 + side)
    thing = SceneObject(shape, colour, "large", "solid", grid_position(box, size, size), box)
    return Scene(size, size, "white", (thing,), None)


def png_bytes(image: Image.Image) -> bytes:
    """A PIL image encoded as PNG (lossless: the colours a test wrote are the colours read)."""
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(folder: Path, samples: list[dict[str, bytes]], per_shard: int = 32) -> Path:
    """``samples`` (tar members by extension: {"png": ..., "txt": ...}) as WebDataset shards
    ``folder``/NNNNN.tar of ``per_shard`` samples, keyed by their index; returns ``folder``."""
    from data_pipeline.shard_io import AtomicShardWriter

    for start in range(0, len(samples), per_shard):
        writer = AtomicShardWriter(folder / f"{start // per_shard:05d}.tar")
        for index in range(start, min(start + per_shard, len(samples))):
            writer.write(f"{index:06d}", samples[index])
        writer.commit()
    return folder


def export_tiny_pipeline(folder: Path) -> Path:
    """A random RecapPipeline exported in diffusers format to ``folder`` (32 px images in a few ms
    each): for stages that sample from train-t2i's export."""
    import torch

    from data_pipeline.caption_tokenizer import train_caption_tokenizer
    from models.diffusion import make_scheduler
    from models.pipeline import export_pipeline
    from models.text_conditioning import CaptionTransformer, build_t5_encoder
    from models.unet import build_unet
    from models.vae import build_vae

    texts = [f"a {c} {s} on a white background" for c in ("red", "blue", "green") for s in ("circle", "star", "heart")]
    tokenizer = train_caption_tokenizer(texts, vocab_size=120, max_tokens=16)
    torch.manual_seed(0)
    return export_pipeline(
        folder, tokenizer=tokenizer,
        text_encoder=build_t5_encoder(pretrained=None, architecture={"d_model": 32, "d_kv": 8, "d_ff": 64,
                                                                     "num_layers": 1, "num_heads": 2},
                                      vocab_size=len(tokenizer)),
        caption_transformer=CaptionTransformer(text_dim=32, width=16, layers=1, heads=2, pooled_dim=16),
        unet=build_unet(block_out_channels=[32, 32], attention_levels=[False, True], layers_per_block=1,
                        attention_head_dim=8, cross_attention_dim=16, pooled_dim=16, norm_num_groups=8),
        vae=build_vae([8, 8, 8, 8], layers_per_block=1, norm_num_groups=8),
        scheduler=make_scheduler(prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=1000))


def assert_close_to_scale(actual, expected, rel: float = 1e-5, msg: str = "") -> None:
    """Two float32 computations of the same quantity that differ only in how the sums are grouped
    (batched vs unbatched, padded vs not, our loop vs a peer's, the CPU's BLAS kernels) agree to
    ``rel`` of the expected tensor's scale: max |actual - expected| <= rel * max |expected|.

    An absolute tolerance holds only for one magnitude and one CPU: float32 rounding is relative
    (eps 1.2e-7 per operation; ~1e-6 after a 10-step sampler on an AMD EPYC, where a batched
    and an unbatched matmul take different kernels). Bit-equality stays for repeats of one
    computation on one machine.
    """
    import torch

    actual, expected = torch.as_tensor(actual).detach(), torch.as_tensor(expected).detach()
    assert actual.shape == expected.shape, (msg, actual.shape, expected.shape)
    scale = float(expected.abs().max())
    error = float((actual - expected).abs().max())
    assert error <= rel * max(scale, 1e-30), f"{msg} max |difference| {error:.3g} > {rel:g} x scale {scale:.3g}"
