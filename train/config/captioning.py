"""The captioner inference stages' sections: caption, evaluate-captioner, recaption,
train-tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field

from models.decoding_options import DecodingOptions
from train.config.typed import ConfigError


@dataclass(frozen=True)
class CaptionConfig:
    """`recap caption`: caption a folder of images, an image file, or shards."""

    captioner: str  # an exported captioner directory (finetune-captioner's <style>/captioner)
    input: str | None = None  # required on the command line: caption.input=<folder|image|shards>
    output: str | None = None  # a JSONL file; null prints "<key>\t<caption>" lines
    batch_size: int = 16
    limit: int | None = None  # caption at most this many images
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be >= 1 or null, got {self.limit}")


@dataclass(frozen=True)
class EvaluateCaptionerConfig:
    """`recap evaluate-captioner`: attribute precision/recall of alt-text and captioners on
    held-out toy samples (``input``), against their ground truth."""

    input: str  # held-out shards with ground truth (conf: evaluate.input, so the report's examples are evaluate's)
    captioners: dict[str, str]  # name -> exported captioner directory
    samples: int | None = 256  # held-out samples scored (null: all)
    batch_size: int = 32
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError("samples", f"must be >= 1 or null, got {self.samples}")


@dataclass(frozen=True)
class RecaptionConfig:
    """`recap recaption`: write each caption key's captioner output into every input shard."""

    input: str  # shards: a directory of .tar files, a brace pattern, pipe: commands
    output: str  # a directory; one shard per input shard, same name
    captioners: dict[str, str]  # caption key -> exported captioner directory
    keys: list[str] = field(default_factory=lambda: ["ssc", "dsc"])  # which captioners run, in order
    batch_size: int = 32
    num_workers: int = 2  # DataLoader workers decoding and preprocessing images
    only_failures: bool = False  # redo only the keys listed as failures of done shards
    rank: int | None = None  # null: from torchrun (RANK) or a Slurm array (SLURM_ARRAY_TASK_ID)
    world_size: int | None = None
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if not self.keys:
            raise ConfigError("keys", "must name at least one caption key")


@dataclass(frozen=True)
class TrainTokenizerConfig:
    """`recap train-tokenizer`: fit the toy T5 tokenizer (saved at text_encoder.tokenizer)."""

    input: str  # shards whose captions it learns from (recaption's output)
    keys: list[str] = field(default_factory=lambda: ["txt", "ssc", "dsc"])  # caption keys read
    vocab_size: int = 1000
    samples: int | None = None  # read at most this many samples (null: all)

    def validate(self) -> None:
        if not self.keys:
            raise ConfigError("keys", "must name at least one caption key")
        if self.samples is not None and self.samples < 1:
            raise ConfigError("samples", f"must be >= 1 or null, got {self.samples}")
