"""Config sections of the evaluation stages: `recap train-eval-clip` (toy judges) and `recap evaluate`.

Part of the schema; train/config/experiment.py composes the sections into ExperimentConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from train.config.sampling import SamplerConfig
from train.config.training import TrainingStageConfig
from train.config.typed import ConfigError


@dataclass(frozen=True)
class ProbeConfig:
    """The attribute probe's CNN (models/attribute_probe.py): input side in pixels, the width of a
    full-resolution stem conv (0: none) and of each stride-2 block, its mirror augmentation and its step count."""

    image_size: int = 64  # input side in pixels (images are squashed to it)
    channels: list[int] = field(default_factory=lambda: [32, 64, 128, 128])  # width of each stride-2 conv block
    stem: int = 24  # width of a stride-1 conv before the blocks (0: none)
    # +1.8 points of shape accuracy at 1000 steps on the shapes world (benchmarks/toy_probe_variants.py)
    hflip: bool = True  # mirror half of each batch left-right (positions too; never a scene with a word)
    steps: int | None = None  # the probe's training steps; null: train_eval_clip.steps (the CLIP's)

    def validate(self) -> None:
        if self.image_size < 8 or not self.channels or min(self.channels) < 1:
            raise ConfigError("image_size", "image_size must be >= 8 and channels a non-empty list of widths >= 1")
        if self.stem < 0:
            raise ConfigError("stem", f"must be >= 0 (0: no stem), got {self.stem}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError("steps", f"must be >= 1 (null: train_eval_clip.steps), got {self.steps}")


@dataclass(frozen=True, kw_only=True)
class TrainEvalClipConfig(TrainingStageConfig):
    """`recap train-eval-clip` (toy): the judges of `recap evaluate`, trained on ground truth.

    ``train``/``test``: held-out shards with toy ground truth; the judges learn from ``train``
    and their accuracy is measured on the real images of ``test`` (what evaluate prompts from).
    ``extra_scenes``: more held-out scenes rendered in memory for training (the held-out split's
    scenes after the ones written to shards, from ``data.toy``; never seen by another stage).
    ``clip``: an open_clip CLIP model config (embed_dim, vision_cfg, text_cfg). The contrastive
    loss needs the whole batch at once: micro_batch_size must equal global_batch_size.
    ``retrieval_candidates``: N of the top-1 retrieval accuracy (chance 1/N)."""

    train: str  # held-out toy shards the judges learn from
    test: str  # held-out toy shards they are measured on (real images; evaluate prompts from them)
    clip: dict[str, Any]  # open_clip CLIP model config: embed_dim, vision_cfg, text_cfg
    extra_scenes: int = 0  # more held-out scenes rendered in memory for training (needs data.toy)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    retrieval_candidates: int = 32  # N of the CLIP's top-1 retrieval accuracy (chance 1/N)

    def validate(self) -> None:
        super().validate()
        if self.micro_batch_size != self.global_batch_size:
            raise ConfigError("micro_batch_size", f"must equal global_batch_size ({self.global_batch_size}): the "
                              "contrastive loss compares every image with every caption of the batch")
        if self.extra_scenes < 0:
            raise ConfigError("extra_scenes", f"must be >= 0, got {self.extra_scenes}")
        if self.retrieval_candidates < 2:
            raise ConfigError("retrieval_candidates", f"must be >= 2, got {self.retrieval_candidates}")
        if not {"embed_dim", "vision_cfg", "text_cfg"} <= set(self.clip):
            raise ConfigError("clip", "needs an open_clip CLIP config with embed_dim, vision_cfg and text_cfg")


@dataclass(frozen=True)
class ClipJudgeConfig:
    """The CLIP that scores images: ``folder``, an open_clip folder (open_clip_config.json +
    weights; what train-eval-clip exports), or ``model_name``, an open_clip config name, with
    ``pretrained``, a local checkpoint file (the paper: ViT-B/32, OpenAI's weights, which need
    ``ViT-B-32-quickgelu``). Never downloads: a name without a local file is refused."""

    folder: str | None = None  # an exported open_clip folder (toy: train-eval-clip's clip/)
    model_name: str | None = "ViT-B-32-quickgelu"  # an open_clip config name (with pretrained)
    pretrained: str | None = None  # a local open_clip checkpoint file of model_name

    def validate(self) -> None:
        if (self.folder is None) == (self.model_name is None):
            raise ConfigError("folder", "set exactly one of clip.folder (an exported open_clip folder) or "
                              "clip.model_name (with clip.pretrained, a local checkpoint file)")
        if self.model_name is not None and not self.pretrained:
            raise ConfigError("pretrained", f"clip.model_name={self.model_name} needs clip.pretrained, a local "
                              "checkpoint file (nothing is downloaded)")
        if self.folder is not None and self.pretrained is not None:
            raise ConfigError("pretrained", "clip.folder holds its own weights; set clip.pretrained=null")


@dataclass(frozen=True)
class EvaluateConfig:
    """`recap evaluate`: generate from the alt-text and from the DSC of ``samples`` held-out
    samples of ``input`` at ``size`` x ``size`` pixels; CLIP score of each image against its
    prompt, and (``probe`` set, toy ground truth in the samples) attribute-binding accuracy of the
    DSC images. The real images are scored the same way (the judges' ceiling)."""

    input: str  # held-out shards: alt-text (KEY.txt) and a DSC (KEY.dsc.txt or toy gt_dsc) per sample
    sampler: SamplerConfig
    clip: ClipJudgeConfig = field(default_factory=ClipJudgeConfig)
    probe: str | None = None  # a saved attribute probe folder (train-eval-clip's probe/); null: no attribute accuracy
    samples: int = 256  # the first N samples of input are prompted (the paper: 50,000)
    size: int = 256  # generated images are size x size pixels

    def validate(self) -> None:
        if self.samples < 1:
            raise ConfigError("samples", f"must be >= 1, got {self.samples}")
        if self.size < 8:
            raise ConfigError("size", f"must be >= 8 pixels, got {self.size}")
