"""CoCa captioners (open_clip): building, the training forward with CoCaLoss, export/load.

open_clip does the modelling (towers, CoCaLoss, preprocessing, tokenizer); this module only
adds what the recipe needs around it:
- building a CoCa from a custom architecture dict (toy) or a built-in name with local weights;
- initialising `text_decoder.text_projection`, which open_clip leaves as `torch.empty` when a
  CoCa is built from scratch (it is only ever overwritten by pretrained weights);
- a training forward that computes the decoder only up to the longest caption of the batch:
  the decoder is causal and padded labels are ignored by the caption loss, so the loss is the
  same as over the full context while the (B, L, 49408) logits shrink to the captions' length.
  The text tower still sees the full context, so the appended CLS token (the contrastive text
  embedding) sits where open_clip puts it;
- export to what open_clip loads: a weights file for `create_model_and_transforms(name,
  pretrained=file)` and an `open_clip_config.json` for `local-dir:` loading, with the fitted
  tokenizer's files beside them when the captioner has one (models/captioner_tokenizer.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from safetensors.torch import load_model, save_model

from models.captioner_tokenizer import (OPEN_CLIP_IDS, OPEN_CLIP_VOCAB_SIZE, CaptionerTokenizer, model_tokenizer,
                                        open_clip_tokenizer)

SOT_ID, EOT_ID, PAD_ID = OPEN_CLIP_IDS.sot, OPEN_CLIP_IDS.eot, OPEN_CLIP_IDS.pad  # open_clip's BPE; pad 0 is also "!"
WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_FILE = "open_clip_config.json"
# Keys of open_clip model configs that create_model consumes rather than the CoCa constructor.
_FACTORY_KEYS = ("custom_text",)


def coca_config(model_name: str, architecture: dict[str, Any] | None) -> dict[str, Any]:
    """The open_clip model config: ``architecture`` if given, else open_clip's built-in one."""
    if architecture is not None:
        return dict(architecture)
    config = open_clip.get_model_config(model_name)
    if config is None or "multimodal_cfg" not in config:
        coca = [m for m in open_clip.list_models() if m.startswith("coca")]
        raise ValueError(f"'{model_name}' is not an open_clip CoCa config; built-in CoCa configs: {coca}")
    return config


def with_vocab_size(architecture: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """A copy of the open_clip model config ``architecture`` whose text tower and decoder have
    ``vocab_size`` tokens (the tokenizer's). ValueError if it already names another size."""
    out = dict(architecture)
    for tower in ("text_cfg", "multimodal_cfg"):
        named = out.get(tower, {}).get("vocab_size", vocab_size)
        if named != vocab_size:
            raise ValueError(f"{tower}.vocab_size={named} but the tokenizer has {vocab_size} tokens; make them equal "
                             "(or leave vocab_size out of the architecture)")
        out[tower] = {**out.get(tower, {}), "vocab_size": vocab_size}
    return out


def build_captioner(model_name: str, architecture: dict[str, Any] | None = None,
                    pretrained: str | None = None) -> open_clip.CoCa:
    """A CoCa in fp32 on the CPU: random init, or weights from a local open_clip checkpoint.

    Args:
        model_name: open_clip config name (e.g. coca_ViT-L-14), or the name given to ``architecture``.
        architecture: custom open_clip model config (embed_dim, vision_cfg, text_cfg, multimodal_cfg).
        pretrained: a local .safetensors/.bin/.pt open_clip checkpoint (no hub access).
    """
    config = coca_config(model_name, architecture)
    try:
        model = open_clip.CoCa(**{k: v for k, v in config.items() if k not in _FACTORY_KEYS})
    except (AssertionError, TypeError, ValueError) as exc:  # open_clip asserts on inconsistent sizes
        raise ValueError(f"not a valid open_clip CoCa config ({exc or type(exc).__name__}); note that "
                         "multimodal_cfg.width must equal embed_dim and widths must divide by their heads") from None
    width = model.text_decoder.width
    torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
    if pretrained is not None:
        if not Path(pretrained).is_file():
            raise FileNotFoundError(f"captioner checkpoint {pretrained} does not exist")
        open_clip.load_checkpoint(model, pretrained, weights_only=True)
    return model


def image_transform(model: open_clip.CoCa) -> Any:
    """open_clip's preprocessing for this model, for training and inference alike: images of any
    aspect are squashed to the square input. Not open_clip's training transform
    (RandomResizedCrop): a crop cuts away objects, positions and words the caption names, so
    the target would describe pixels the model never sees. Deterministic, so a resumed run sees
    exactly the pixels an uninterrupted one would."""
    size = model.visual.image_size
    return open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                     std=open_clip.OPENAI_DATASET_STD, resize_mode="squash")


class SplitImageTransform:
    """`image_transform` cut in two for batched inference, with bit-identical results:
    ``pixels(pil)`` resizes on the CPU (in a DataLoader worker) to a uint8 (3, S, S) tensor, a
    quarter of the float bytes to pass between processes and to the device, and
    ``normalize(batch)`` scales and normalises a (B, 3, S, S) uint8 batch on its device in one go.
    open_clip's Compose pays torch's per-call overhead on every image instead (about 1 ms each).
    """

    def __init__(self, model: open_clip.CoCa) -> None:
        self.size = tuple(model.visual.image_size)
        self.mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def pixels(self, image: Any) -> torch.Tensor:
        from PIL import Image

        resized = image.resize(self.size[::-1], Image.Resampling.BICUBIC).convert("RGB")  # as Resize, then RGB
        return torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        # The same elementwise ops as ToTensor + Normalize, so the same floats.
        x = batch.to(torch.get_default_dtype()).div(255)
        return x.sub_(self.mean.to(x.device)).div_(self.std.to(x.device))

    def key(self) -> tuple:
        """Equal for captioners that preprocess alike (they share the pixels)."""
        return (self.size, tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist()))


def tokenizer(model: open_clip.CoCa) -> CaptionerTokenizer:
    """open_clip's BPE tokenizer (its vocabulary ships with open_clip) at the model's context.
    A captioner with a fitted tokenizer has a smaller vocabulary: ValueError (`load_exported_tokenizer`)."""
    if model.text.vocab_size != OPEN_CLIP_VOCAB_SIZE:
        raise ValueError(f"this captioner has {model.text.vocab_size} tokens, not open_clip's {OPEN_CLIP_VOCAB_SIZE}: "
                         "its tokenizer is the fitted one in its exported folder (load_exported_tokenizer)")
    return open_clip_tokenizer(model.text.context_length)


class CaptionerTraining(torch.nn.Module):
    """CoCa + CoCaLoss as one forward (DDP and DeepSpeed only see calls to forward)."""

    def __init__(self, coca: open_clip.CoCa, loss: open_clip.CoCaLoss, eot_id: int = EOT_ID) -> None:
        """eot_id: the tokenizer's end-of-text id (open_clip's BPE: 49407; a fitted tokenizer's: 2)."""
        super().__init__()
        self.coca, self.loss, self.eot_id = coca, loss, eot_id

    def forward(self, images: torch.Tensor, texts: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, S, S) preprocessed; texts: (B, context) token ids (SOT ... EOT, then pad).

        Returns {"loss", "contrastive", "caption"} (weighted, as CoCaLoss computes them).
        """
        image_latent, image_embs = self.coca._encode_image(images)  # (B, D), (B, N, W)
        length = int((texts == self.eot_id).int().argmax(dim=1).max()) + 1  # SOT .. EOT of the longest caption
        # Without the contrastive term the text tower only feeds the decoder, whose tokens are causal:
        # the padding after the longest caption changes none of them, so it is not computed (a short
        # SSC caption is ~10 of 76 positions). The contrastive term needs the whole context: the
        # CLS token at its end is the text embedding.
        encoded = texts if self.loss.clip_loss_weight else texts[:, :length]
        text_latent, token_embs = self.coca._encode_text(encoded)  # (B, D), (B, context or length, W)
        logits = self.coca.text_decoder(image_embs, token_embs[:, : length - 1])  # (B, length-1, vocab)
        contrastive, caption = self.loss(image_latent, text_latent, logits, texts[:, 1:length],
                                         self.coca.logit_scale.exp())
        return {"loss": contrastive + caption, "contrastive": contrastive.detach(), "caption": caption.detach()}


class CaptionLoss(open_clip.CoCaLoss):
    """open_clip's CoCaLoss, with the captioning term computed on contiguous logits.

    CoCaLoss hands ``logits.permute(0, 2, 1)`` to cross_entropy, so log_softmax strides across
    the 49k-token vocabulary: on CPU that and the copy it forces were ~60% of a toy training step.
    Flattening to (B*L, vocab) gives the same mean over non-pad tokens (a test compares values
    and gradients with CoCaLoss) in half the time (toy CoCa forward+backward, B=32 x 60 tokens,
    this 2-core CPU: 0.83 s vs 1.67 s). The contrastive term is open_clip's.
    """

    def forward(self, image_features, text_features, logits, labels, logit_scale, output_dict=False):
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * open_clip.ClipLoss.forward(self, image_features, text_features,
                                                                             logit_scale)
        else:
            contrastive = torch.tensor(0.0, device=logits.device)
        caption = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                                    ignore_index=self.caption_loss.ignore_index)
        caption = caption * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": caption}
        return contrastive, caption


def caption_loss(*, contrastive_weight: float, caption_weight: float, pad_id: int = PAD_ID, rank: int = 0,
                 world_size: int = 1) -> open_clip.CoCaLoss:
    """CoCaLoss (see CaptionLoss); labels equal to ``pad_id`` count for nothing; with several ranks
    the contrastive part gathers features from all."""
    return CaptionLoss(caption_loss_weight=caption_weight, clip_loss_weight=contrastive_weight,
                       pad_id=pad_id, rank=rank, world_size=world_size)


def export_captioner(model: open_clip.CoCa, config: dict[str, Any], out_dir: Path, model_name: str,
                     tokenizer: CaptionerTokenizer | None = None) -> Path:
    """Write ``out_dir`` loadable by open_clip in both ways:

    - ``open_clip.create_model_and_transforms(model_name, pretrained=out_dir/WEIGHTS_FILE)`` for
      a built-in name, or after ``open_clip.add_model_config(out_dir/<model_name>.json)``;
    - ``open_clip.create_model_and_transforms("local-dir:" + str(out_dir))``.

    ``tokenizer`` None or open_clip's BPE: ``open_clip.get_tokenizer`` gives open_clip's BPE. A
    fitted one is saved into ``out_dir`` and ``text_cfg.hf_tokenizer_name`` names the folder:
    ``get_tokenizer("local-dir:D")`` reads the tokenizer from D itself whatever the name says (so
    the folder can move), ``get_tokenizer(model_name)`` after add_model_config from the path,
    absolute as the folder was when exported (as a hub export names its own repository).
    """
    text_cfg = dict(config["text_cfg"])
    fitted = tokenizer is not None and tokenizer.fitted
    if tokenizer is not None:
        tokenizer.check_model(model)
    if text_cfg.get("hf_tokenizer_name") and not fitted:
        raise ValueError("the config names a fitted tokenizer (text_cfg.hf_tokenizer_name): export it with the "
                         "captioner")
    out_dir.mkdir(parents=True, exist_ok=True)
    if fitted:
        tokenizer.save(out_dir)
        text_cfg["hf_tokenizer_name"] = str(out_dir.resolve())
    save_model(model, str(out_dir / WEIGHTS_FILE))
    model_cfg = {**config, "text_cfg": text_cfg, "custom_text": True}
    preprocess = {"size": model.visual.image_size, "mean": list(open_clip.OPENAI_DATASET_MEAN),
                  "std": list(open_clip.OPENAI_DATASET_STD), "interpolation": "bicubic", "resize_mode": "squash"}
    (out_dir / CONFIG_FILE).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=2))
    (out_dir / f"{model_name}.json").write_text(json.dumps(model_cfg, indent=2))
    return out_dir


def load_exported(out_dir: Path) -> open_clip.CoCa:
    """Rebuild an exported captioner (our side of the round trip), weights loaded safely."""
    config = json.loads((out_dir / CONFIG_FILE).read_text())["model_cfg"]
    model = open_clip.CoCa(**{k: v for k, v in config.items() if k not in _FACTORY_KEYS})
    load_model(model, str(out_dir / WEIGHTS_FILE))
    return model.eval()


def load_exported_tokenizer(out_dir: Path) -> CaptionerTokenizer:
    """An exported captioner's tokenizer: the fitted one saved in ``out_dir``, or open_clip's BPE;
    the same as ``open_clip.get_tokenizer("local-dir:" + str(out_dir))`` gives."""
    return model_tokenizer(json.loads((out_dir / CONFIG_FILE).read_text())["model_cfg"], out_dir)
