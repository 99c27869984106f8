"""Caption decoding throughput: our KV-cached greedy decoder against open_clip's ``CoCa.generate``.

Same weights, same images, measured alternately in one run (best of --repeats, after one warm-up
of each). open_clip runs ``generation_type="top_k", top_k=1`` (top-1 then multinomial = argmax),
our side ``DecodingOptions(strategy="greedy")``. Every caption is forced to full length so both
sides do the same work: min_length = max_length - 1 and the EOT and pad columns of the decoder's
text_projection are zeroed (their logit is exactly 0, while the best of ~49k random logits is
positive). Tokens counted per caption: max_length - 1 (everything after SOT, forced EOT included).
Both timings include the one image encode per batch that both sides do. Goal: >= 10x at batch
32 x 30 tokens on CPU, growing with length. The outputs are compared token for token ("same").

    python benchmarks/caption_decoding.py                                   # tiny CoCa, CPU
    python benchmarks/caption_decoding.py --model coca_ViT-L-14 --device cuda --repeats 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import open_clip
import open_clip.coca_model
import torch
import yaml
from transformers import TopKLogitsWarper

from models.caption_decoding import EOT_ID, PAD_ID, DecodingOptions, content_tokens, generate_tokens

TOY_CONFIG = Path(__file__).resolve().parent.parent / "conf" / "captioner" / "coca_tiny.yaml"


def enable_open_clip_generate() -> None:
    """open_clip 3.3 turns generate off when transformers lacks BeamSearchScorer (transformers 5).

    The transformers names generate uses were bound before the failing import, so setting the two
    flags is enough for top_k; reloading open_clip.coca_model would re-create the CoCa class.
    """
    open_clip.coca_model._has_transformers = True
    open_clip.coca_model.GENERATION_TYPES["top_k"] = TopKLogitsWarper


def build_model(name: str, device: str) -> tuple[torch.nn.Module, int]:
    """A random-weight CoCa that never ends a caption early, and its image size."""
    torch.manual_seed(0)
    if name == "tiny":  # the toy experiment's CoCa (conf/captioner/coca_tiny.yaml)
        model = open_clip.CoCa(**yaml.safe_load(TOY_CONFIG.read_text())["architecture"])
    else:
        model = open_clip.create_model(name, pretrained=None)
    projection = model.text_decoder.text_projection  # open_clip leaves it torch.empty (uninitialised)
    with torch.no_grad():
        torch.nn.init.normal_(projection, std=projection.shape[0] ** -0.5)
        projection[:, [EOT_ID, PAD_ID]] = 0.0
    return model.to(device).eval(), model.visual.image_size[0]


def timed(fn: Callable[[], list[list[int]]], device: str) -> tuple[float, list[list[int]]]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def measure(model: torch.nn.Module, images: torch.Tensor, length: int, repeats: int, device: str) -> dict:
    options = DecodingOptions(max_length=length, min_length=length - 1)

    def theirs() -> list[list[int]]:
        with torch.inference_mode():
            out = model.generate(images, generation_type="top_k", top_k=1, seq_len=length, min_seq_len=length - 1)
        return [content_tokens(row, EOT_ID, PAD_ID) for row in out.tolist()]

    def ours() -> list[list[int]]:
        return generate_tokens(model, images, options)

    runs = {"open_clip": (theirs, []), "ours": (ours, [])}
    outputs = {}
    for name, (fn, _) in runs.items():  # warm-up
        outputs[name] = fn()
    for _ in range(repeats):  # alternate so drift in machine load hits both
        for name, (fn, times) in runs.items():
            seconds, outputs[name] = timed(fn, device)
            times.append(seconds)
    full = all(len(row) == length - 2 for out in outputs.values() for row in out)
    tokens = images.shape[0] * (length - 1)
    return {name: tokens / min(times) for name, (_, times) in runs.items()} | {
        "same": outputs["ours"] == outputs["open_clip"], "full": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="'tiny' (the toy CoCa) or an open_clip CoCa name, e.g. coca_ViT-L-14")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--lengths", type=int, nargs="+", default=[15, 30, 60])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    enable_open_clip_generate()
    model, image_size = build_model(args.model, args.device)
    print(f"model={args.model} device={args.device} torch threads={torch.get_num_threads()} "
          f"best of {args.repeats}; tokens/s count max_length - 1 tokens per caption")
    print(f"{'batch':>5} {'length':>6} {'open_clip tok/s':>15} {'ours tok/s':>10} {'speedup':>8} {'same':>5}")
    generator = torch.Generator().manual_seed(0)
    for batch in args.batches:
        images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(args.device)
        for length in args.lengths:
            result = measure(model, images, length, args.repeats, args.device)
            note = "" if result["full"] else "  (some captions ended early: token counts are off)"
            print(f"{batch:>5} {length:>6} {result['open_clip']:>15.1f} {result['ours']:>10.1f} "
                  f"{result['ours'] / result['open_clip']:>7.1f}x {str(result['same']):>5}{note}", flush=True)


if __name__ == "__main__":
    main()
