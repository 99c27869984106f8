"""Toy captioner training step: open_clip's 49,408-token vocabulary against a small fitted one.

One step is what `recap pretrain-captioner` does per batch: CaptionerTraining (CoCa forward, the
decoder cut to the longest caption) with CoCaLoss, backward, AdamW step. Both models are the toy
CoCa of conf/captioner/coca_tiny.yaml and differ only in vocab_size, as coca_tiny_small_vocab.yaml
does (the token embedding of the text tower, the decoder's output projection and the (B, L, vocab)
logits). Token ids are random
with the same length (SOT, L - 2 content tokens, EOT, pad), so both sides do the same work but
for the vocabulary: L=16 is about the longest alt-text of a pretraining batch, L=64 about the
longest descriptive caption of a DSC fine-tuning batch. Best of --repeats steps after --warmup
steps, each configuration in turn, with torch.set_num_threads(threads).

    OMP_NUM_THREADS=1 python benchmarks/captioner_vocab_step.py
    python benchmarks/captioner_vocab_step.py --batch 32 --threads 2 --lengths 64 --small-vocab 1024
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from models.captioner import CaptionerTraining, build_captioner, caption_loss
from models.captioner_tokenizer import FITTED_IDS, OPEN_CLIP_IDS, OPEN_CLIP_VOCAB_SIZE, SpecialIds

TOY_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "captioner" / "coca_tiny.yaml"


def token_batch(batch: int, length: int, vocab_size: int, ids: SpecialIds, seed: int) -> torch.Tensor:
    """(batch, context) ids: SOT, length - 2 random content tokens, EOT, then pad."""
    generator = torch.Generator().manual_seed(seed)
    texts = torch.full((batch, 76), ids.pad, dtype=torch.long)
    content = torch.randint(4, vocab_size - 2, (batch, length - 2), generator=generator)  # no special id
    texts[:, 0], texts[:, 1 : length - 1], texts[:, length - 1] = ids.sot, content, ids.eot
    return texts


def step_seconds(vocab_size: int, ids: SpecialIds, *, batch: int, length: int, warmup: int, repeats: int) -> float:
    """Best wall time of one forward + backward + AdamW step."""
    architecture = yaml.safe_load(TOY_CONFIG.read_text())["architecture"]
    for tower in ("text_cfg", "multimodal_cfg"):  # as conf/captioner/coca_tiny_small_vocab.yaml does
        architecture[tower]["vocab_size"] = vocab_size
    torch.manual_seed(0)
    coca = build_captioner("coca_toy", architecture)
    model = CaptionerTraining(coca, caption_loss(contrastive_weight=1.0, caption_weight=2.0, pad_id=ids.pad),
                              eot_id=ids.eot)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    size = coca.visual.image_size
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    texts = token_batch(batch, length, vocab_size, ids, seed=2)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        loss = model(images, texts)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small-vocab", type=int, default=768)
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"toy CoCa ({TOY_CONFIG.name}) training step, best of {args.repeats}: s/step")
    print(f"{'threads':>7} {'batch':>5} {'L':>3} | {'vocab ' + str(OPEN_CLIP_VOCAB_SIZE):>11} "
          f"{'vocab ' + str(args.small_vocab):>11} | {'ratio':>5}")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batch:
            for length in args.lengths:
                timing = dict(batch=batch, length=length, warmup=args.warmup, repeats=args.repeats)
                large = step_seconds(OPEN_CLIP_VOCAB_SIZE, OPEN_CLIP_IDS, **timing)
                small = step_seconds(args.small_vocab, FITTED_IDS, **timing)
                print(f"{threads:>7} {batch:>5} {length:>3} | {large:>11.3f} {small:>11.3f} | {large / small:>4.2f}x",
                      flush=True)


if __name__ == "__main__":
    main()
