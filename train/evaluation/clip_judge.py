"""The CLIP judge of `recap evaluate`: its folder format and its loader in one place.

`recap train-eval-clip` (toy) writes the folder with `export_clip`: an open_clip folder
(open_clip_config.json + open_clip_model.safetensors) that ``open_clip.create_model("local-dir:…")``
loads by itself, and, next to each exported judge, judge_accuracy.json (what it scored on real
held-out images). `recap evaluate` reads it back with `load_clip` (or loads a production CLIP from an
open_clip name and a local checkpoint) and `read_judge_accuracy`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors.torch import save_model

from models.clip_score import to_clip_input, tokenize_references
from train.config.evaluation import ClipJudgeConfig
from train.config.typed import ConfigError

CLIP_CONFIG_FILE, CLIP_WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
ACCURACY_FILE = "judge_accuracy.json"  # next to each exported judge: what it scored on real held-out images
MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def build_clip(config: dict[str, Any], key: str) -> open_clip.CLIP:
    """A plain open_clip CLIP (fp32, CPU, random init) from a model config dict; ConfigError
    naming ``key`` when open_clip refuses the config."""
    try:
        return open_clip.CLIP(**{k: v for k, v in config.items() if k != "custom_text"})
    except (AssertionError, TypeError, ValueError) as exc:
        raise ConfigError(key, f"not a valid open_clip CLIP config ({exc or type(exc).__name__})") from None


def export_clip(model: open_clip.CLIP, config: dict[str, Any], folder: Path) -> Path:
    """An open_clip folder: ``open_clip.create_model("local-dir:" + str(folder))`` loads it (with its
    preprocessing: squash to the input size, OpenAI mean/std) and ``open_clip.get_tokenizer`` too."""
    folder.mkdir(parents=True, exist_ok=True)
    save_model(model, str(folder / CLIP_WEIGHTS_FILE))
    size = model.visual.image_size
    preprocess = {"size": list(size) if isinstance(size, tuple) else size, "mean": list(MEAN), "std": list(STD),
                  "interpolation": "bicubic", "resize_mode": "squash"}
    (folder / CLIP_CONFIG_FILE).write_text(json.dumps({"model_cfg": config, "preprocess_cfg": preprocess}, indent=2))
    return folder


def write_judge_accuracy(folder: Path, accuracy: dict[str, Any]) -> Path:
    """``folder``/judge_accuracy.json: an exported judge's numbers on real held-out images."""
    path = folder / ACCURACY_FILE
    path.write_text(json.dumps(accuracy, indent=2) + "\n")
    return path


def read_judge_accuracy(folder: str | None) -> dict[str, Any] | None:
    """A judge's own accuracy on real held-out images, as train-eval-clip measured it (None when
    ``folder`` is None or holds no judge_accuracy.json, e.g. a production CLIP)."""
    path = None if folder is None else Path(folder) / ACCURACY_FILE
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


@dataclass
class ClipJudge:
    """An open_clip model and what it needs: its tokenizer, input size, mean/std."""

    model: Any
    tokenizer: Any
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    @torch.no_grad()
    def images(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) image embeddings."""
        device = next(self.model.parameters()).device
        return torch.cat([self.model.encode_image(to_clip_input(images[i: i + batch_size].to(device), self.size,
                                                                self.mean, self.std))
                          for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def texts(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """N captions -> (N, D) text embeddings (long ones truncated inside the context, EOT kept)."""
        device = next(self.model.parameters()).device
        tokens = tokenize_references(self.tokenizer, texts, self.tokenizer.context_length)
        return torch.cat([self.model.encode_text(tokens[i: i + batch_size].to(device))
                          for i in range(0, len(texts), batch_size)])


def load_clip(c: ClipJudgeConfig, device: torch.device) -> ClipJudge:
    """The judge CLIP from an exported open_clip folder, or an open_clip name + local checkpoint
    file (never a download). ConfigError naming the key when it is not there."""
    if c.folder is not None:
        folder = Path(c.folder)
        if not (folder / CLIP_CONFIG_FILE).is_file() or not any(folder.glob("*.safetensors")):
            raise ConfigError("evaluate.clip.folder", f"{folder} is not an exported open_clip folder "
                              f"({CLIP_CONFIG_FILE} + weights); run `recap train-eval-clip` first (toy) or set "
                              "clip.model_name and clip.pretrained")
        name, pretrained = f"local-dir:{folder}", None
    else:
        if not Path(str(c.pretrained)).is_file():
            raise ConfigError("evaluate.clip.pretrained", f"{c.pretrained} is not a file: point it at a local "
                              f"open_clip checkpoint of {c.model_name} (e.g. OpenAI's ViT-B/32 weights)")
        if open_clip.get_model_config(c.model_name) is None:
            raise ConfigError("evaluate.clip.model_name", f"{c.model_name!r} is not an open_clip model config; e.g. "
                              "ViT-B-32-quickgelu (OpenAI's weights) or ViT-B-32")
        name, pretrained = c.model_name, c.pretrained
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device=device).eval()
    except (RuntimeError, ValueError) as exc:  # open_clip's errors for weights that do not fit the config
        key = "evaluate.clip.folder" if c.folder is not None else "evaluate.clip.pretrained"
        raise ConfigError(key, f"open_clip could not load {c.folder or c.pretrained}: {exc}") from None
    pp = model.visual.preprocess_cfg
    size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
    return ClipJudge(model, open_clip.get_tokenizer(name), size, tuple(pp["mean"]), tuple(pp["std"]),
                     c.folder or f"{c.model_name} ({c.pretrained})")
