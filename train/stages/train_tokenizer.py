"""`recap train-tokenizer`: fit the toy T5's tokenizer on the captions it will encode.

Reads the text members named by train_tokenizer.keys (alt-text ``txt`` and the recaptioned
``ssc``/``dsc``) from train_tokenizer.input, trains a BPE tokenizer with T5's special tokens
(data_pipeline/caption_tokenizer.py) and saves it in Hugging Face format at
text_encoder.tokenizer. Production skips this stage: T5-XXL's folder has its own tokenizer.

Reads: train_tokenizer, text_encoder (tokenizer, max_tokens, pretrained), data.reader, logger.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_pipeline.caption_mix import caption_member
from data_pipeline.caption_tokenizer import save_tokenizer, train_caption_tokenizer
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_io import NoShardsError, list_shards
from data_pipeline.shard_reader import ShardReader
from train.config.captioning import TrainTokenizerConfig
from train.config.experiment import ExperimentConfig
from train.outputs.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.config.typed import ConfigError


def _texts(t: TrainTokenizerConfig, reader_options: ReaderOptions, counts: dict[str, int]) -> Iterator[str]:
    """The non-empty texts under ``t.keys`` of the first ``t.samples`` samples of ``t.input``;
    counts them per key into ``counts``."""
    try:
        shards = list_shards(t.input)
    except NoShardsError as exc:
        raise ConfigError("train_tokenizer.input", str(exc)) from None
    members = [caption_member(k) for k in t.keys]
    options = dataclasses.replace(reader_options, num_workers=min(reader_options.num_workers, len(shards)))
    reader = ShardReader(shards, spec=SampleSpec(GroundTruthAccess.NONE, image=False, optional_texts=tuple(members)),
                         options=options, batch_size=64, seed=0, epochs=1, collate=list)
    seen = 0
    for batch in reader:
        for sample in batch:
            for key, member in zip(t.keys, members, strict=True):
                if sample[member].strip():
                    counts[key] = counts.get(key, 0) + 1
                    yield sample[member]
            seen += 1
            if t.samples is not None and seen >= t.samples:
                return


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Train and save the tokenizer; returns its summary."""
    te, t = cfg.text_encoder, cfg.train_tokenizer
    if te.pretrained is not None or te.tokenizer is None:
        raise ConfigError("text_encoder.tokenizer", "train-tokenizer is for a T5 built from an architecture (toy); "
                          "a pretrained T5 folder brings its own tokenizer")
    log = setup_logging(run_dir, "train_tokenizer")
    write_config_snapshot(run_dir, cfg)
    counts: dict[str, int] = {}
    tokenizer = train_caption_tokenizer(_texts(t, cfg.data.reader, counts), vocab_size=t.vocab_size,
                                        max_tokens=te.max_tokens)
    if not counts:
        raise ConfigError("train_tokenizer.keys", f"no text under {list(t.keys)} in {t.input}; run `recap recaption` "
                          "first, or choose keys the shards have")
    out = save_tokenizer(tokenizer, Path(te.tokenizer))
    summary = {"tokenizer": str(out), "vocab_size": len(tokenizer), "texts_by_key": counts,
               "max_tokens": te.max_tokens}
    finish_stage(run_dir, "train-tokenizer", summary)
    log.info("saved a %d-token tokenizer to %s", len(tokenizer), out)
    return summary
