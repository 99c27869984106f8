"""CLIP score, the paper's automatic prompt-following metric (DALL-E 3, section 5.1).

``clip_score(image, caption) = 100 * cos(E_image, E_caption)``: the cosine similarity of a CLIP's
image and text embeddings, times 100, averaged over samples. The paper uses ViT-B/32 and scores
each generated image against the alt-text and the descriptive caption (DSC) of held-out samples.

Definition used here: the plain mean of ``100 * cos`` per pair, NOT clamped. torchmetrics'
``CLIPScore`` returns ``max(mean(100 * cos), 0)`` (its docstring says per pair, its code clamps
the mean); the two agree whenever the mean is >= 0, which is the case for any CLIP worth using.
A negative mean is kept because it says something: the judge puts images away from their
prompts (tests/models/test_clip_score.py checks both facts against torchmetrics).

Pure tensor code: no IO, no config. A "CLIP" is anything with ``encode_image(pixels)`` and
``encode_text(tokens)`` (open_clip's CLIP and CoCa, or an adapter around another library's).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F


class ClipLike(Protocol):
    def encode_image(self, image: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, text: torch.Tensor) -> torch.Tensor: ...


def pair_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``100 * cos`` of each (image, text) pair: (B, D), (B, D) -> (B,) float32, in [-100, 100]."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image and text features differ in shape: {tuple(image_features.shape)} vs "
                         f"{tuple(text_features.shape)}")
    return 100 * F.cosine_similarity(image_features.float(), text_features.float(), dim=-1, eps=1e-12)


def score_matrix(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``100 * cos`` of every image with every text: (B, D), (N, D) -> (B, N) float32."""
    image = F.normalize(image_features.float(), dim=-1)
    text = F.normalize(text_features.float(), dim=-1)
    return 100 * image @ text.T


def retrieval_top1(scores: torch.Tensor) -> tuple[float, float]:
    """(image->text, text->image) top-1 accuracy of a square (N, N) score matrix whose matching
    pairs are on the diagonal: the fraction of rows (columns) whose best entry is the diagonal one.
    Chance is 1/N."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"needs a square (N, N) score matrix, got {tuple(scores.shape)}")
    target = torch.arange(scores.shape[0], device=scores.device)
    image_to_text = (scores.argmax(dim=1) == target).float().mean().item()
    text_to_image = (scores.argmax(dim=0) == target).float().mean().item()
    return image_to_text, text_to_image


def tokenize_references(tokenizer: Any, texts: Sequence[str], context_length: int) -> torch.Tensor:
    """Token ids (B, context_length) of reference captions with open_clip's tokenizer.

    A CLIP text tower pools at the end-of-text token (open_clip: at ``argmax`` of the ids, EOT
    being the largest id; Hugging Face: at the first EOT), so a long DSC cut at the context length
    without its EOT would be pooled at some word in the middle. open_clip's ``SimpleTokenizer``
    already truncates inside the context and writes EOT into the last position
    (``tokens[:context_length]; tokens[-1] = eot``), so we use it as is rather than re-implement
    it; the assertion guards that property against a tokenizer that does not keep it (e.g. one
    with a ``reduction_fn``). Pad is 0.
    """
    ids = tokenizer(list(texts), context_length=context_length)  # (B, context_length)
    eot = tokenizer.eot_token_id
    assert bool((ids == eot).any(dim=1).all()), "every tokenized reference must keep its end-of-text token"
    return ids


def to_clip_input(images: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Images (B, 3, H, W) float in [0, 1] (generated, or real decoded to floats) -> the CLIP's input
    (B, 3, size, size): squashed to the square input (bicubic, antialiased; as open_clip's
    ``resize_mode="squash"``), clamped to [0, 1], normalised with ``mean`` and ``std``."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    x = x.clamp(0.0, 1.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def encode_pairs(model: ClipLike, pixels: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised (image, text) embeddings (B, D) each: ``pixels`` (B, 3, S, S) already
    preprocessed, ``tokens`` (B, L) already tokenized."""
    return model.encode_image(pixels), model.encode_text(tokens)


def clip_scores(model: ClipLike, pixels: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``100 * cos`` per (image, caption) pair (B,): ``pixels`` (B, 3, S, S) preprocessed for the
    model, ``tokens`` (B, L) from ``tokenize_references``. Average it for the CLIP score."""
    image, text = encode_pairs(model, pixels, tokens)
    return pair_scores(image, text)
