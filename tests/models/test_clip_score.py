"""CLIP score: the formula on known vectors, retrieval, EOT kept for long references, and agreement
with torchmetrics' CLIPScore on the same tiny Hugging Face CLIP and inputs."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
from torch import nn

from models.clip_score import (
    clip_scores, pair_scores, retrieval_top1, score_matrix, to_clip_input, tokenize_references,
)

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD
SHORT = ["a large red circle in the top left on a beige background.",
         'The word "apple" is written in blue.',
         "Two shapes on a white backdrop: a small striped green star and a medium dotted orange heart.",
         "a pink cross"]
# A DSC longer than the 77-token context (toy DSCs reach ~85 tokens).
LONG = ("Against a sunset gradient backdrop there are four shapes. A large striped red circle sits towards the top "
        "left. A medium dotted blue hexagon can be seen near the right edge. A small solid green triangle appears at "
        "the bottom. In the center, there is a large dotted purple heart. It also shows the word \"garden\" in brown "
        "text, written in large letters near the top right corner of the image.")
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_pair_scores_are_100_cosine_on_known_vectors() -> None:
    image = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0], [1.0, 0.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 1.0], [4.0, 3.0], [-5.0, 0.0]])
    expected = [100.0, 100 / math.sqrt(2), 100 * 24 / 25, -100.0]
    assert pair_scores(image, text).tolist() == pytest.approx(expected, abs=1e-5)
    matrix = score_matrix(image[:3], text[:3])  # (3, 3): every image with every text
    assert matrix.shape == (3, 3)
    assert torch.allclose(matrix.diagonal(), pair_scores(image[:3], text[:3]))
    assert matrix[0, 1].item() == pytest.approx(0.0, abs=1e-5)
    assert matrix[1, 0].item() == pytest.approx(100 / math.sqrt(2))
    with pytest.raises(ValueError, match="differ in shape"):
        pair_scores(image, text[:2])


def test_retrieval_top1_counts_rows_and_columns_won_by_the_diagonal() -> None:
    scores = torch.tensor([[9.0, 1.0, 0.0],   # image 0 -> text 0 (right)
                           [8.0, 2.0, 0.0],   # image 1 -> text 0 (wrong)
                           [0.0, 1.0, 5.0]])  # image 2 -> text 2 (right)
    # columns: text 0 -> image 0 (right), text 1 -> image 1 (right: 2 > 1, 1), text 2 -> image 2 (right)
    assert retrieval_top1(scores) == (pytest.approx(2 / 3), pytest.approx(1.0))
    with pytest.raises(ValueError, match="square"):
        retrieval_top1(torch.zeros(2, 3))


def test_open_clip_tokenizer_truncates_inside_the_context_and_keeps_eot() -> None:
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    sot, eot = tokenizer.sot_token_id, tokenizer.eot_token_id
    full = [sot, *tokenizer.encode(LONG), eot]
    assert len(full) > 77  # the case that matters
    ids = tokenize_references(tokenizer, [LONG, SHORT[0]], 77)
    assert ids.shape == (2, 77)
    assert ids[0, -1].item() == eot and ids[0, :76].tolist() == full[:76]  # the text up to the context, then EOT
    short = [sot, *tokenizer.encode(SHORT[0]), eot]
    assert ids[1, : len(short)].tolist() == short and (ids[1, len(short):] == 0).all()  # padded with 0 after EOT
    assert ids.argmax(dim=1).tolist() == [76, len(short) - 1]  # where open_clip's text tower pools


def test_dropping_eot_would_pool_elsewhere_and_change_the_score() -> None:
    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    tokenizer = open_clip.tokenizer.SimpleTokenizer()
    kept = tokenize_references(tokenizer, [LONG], 77)
    naive = torch.tensor([[tokenizer.sot_token_id, *tokenizer.encode(LONG)][:77]])  # cut at the context: no EOT
    assert (naive == tokenizer.eot_token_id).sum() == 0 and torch.equal(kept[0, :76], naive[0, :76])
    pixels = to_clip_input(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)), 32, MEAN, STD)
    ours, dropped = clip_scores(model, pixels, kept), clip_scores(model, pixels, naive)
    assert abs(ours.item() - dropped.item()) > 0.1, (ours, dropped)


def test_to_clip_input_normalises_and_squashes() -> None:
    grey = torch.full((2, 3, 16, 16), 0.5)
    out = to_clip_input(grey, 16, MEAN, STD)
    expected = [(0.5 - m) / s for m, s in zip(MEAN, STD)]
    assert out.shape == (2, 3, 16, 16)
    assert out[0, :, 3, 7].tolist() == pytest.approx(expected, abs=1e-6)
    wide = torch.rand(1, 3, 16, 32)  # any aspect goes to the square input
    assert to_clip_input(wide, 24, MEAN, STD).shape == (1, 3, 24, 24)
    assert to_clip_input(torch.full((1, 3, 8, 8), 2.0), 8, MEAN, STD)[0, 0, 0, 0].item() == pytest.approx(
        (1.0 - MEAN[0]) / STD[0])  # clamped to [0, 1] first


# ------------------------------------------------------------------ torchmetrics agreement


class _FeatureTensors(nn.Module):
    """transformers 5's CLIPModel.get_*_features return a ModelOutput (the projected features in
    ``pooler_output``); torchmetrics 1.9 divides them as tensors. Its callable model API asks only
    for get_image_features/get_text_features, so this wrapper hands it the tensors."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


class _OurAdapter:
    """The same Hugging Face CLIP behind our encode_image/encode_text interface (open_clip-style
    ids: EOT then 0 padding; the causal text tower never looks past EOT, so padding is inert)."""

    def __init__(self, clip: nn.Module) -> None:
        self.clip = clip

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.get_image_features(pixel_values=pixels).pooler_output

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.clip.get_text_features(input_ids=ids).pooler_output


def _hf_tokenizer():
    """A Hugging Face CLIPTokenizer with open_clip's BPE vocabulary (offline; the same ids)."""
    from transformers import CLIPTokenizer

    ours = open_clip.tokenizer.SimpleTokenizer()
    vocab = dict(ours.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    return CLIPTokenizer(vocab=vocab, merges=sorted(ours.bpe_ranks, key=ours.bpe_ranks.get))


@pytest.fixture(scope="module")
def hf_clip():
    """A tiny random transformers CLIPModel whose image and text embeddings share a direction
    (same projection, same final-norm bias) so that cosines are clearly positive, and its
    processor: no resize or crop, rescale 1/255, OpenAI mean/std (our preprocessing)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    with torch.no_grad():
        model.visual_projection.weight.copy_(model.text_projection.weight)
        shared = torch.randn(32)
        model.vision_model.post_layernorm.bias.copy_(shared)
        model.text_model.final_layer_norm.bias.copy_(shared)
    images = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=True, rescale_factor=1 / 255,
                                do_normalize=True, image_mean=list(MEAN), image_std=list(STD), do_convert_rgb=False)
    return model, CLIPProcessor(image_processor=images, tokenizer=_hf_tokenizer())


def _ours(model: nn.Module, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    ids = tokenize_references(open_clip.tokenizer.SimpleTokenizer(), texts, 77)
    return clip_scores(_OurAdapter(model), to_clip_input(images.float() / 255, 32, MEAN, STD), ids)  # (B,)


def _torchmetrics(model: nn.Module, processor, images: torch.Tensor, texts: list[str]) -> float:
    from torchmetrics.multimodal.clip_score import CLIPScore

    metric = CLIPScore(model_name_or_path=lambda: (_FeatureTensors(model), processor))
    metric.update(images[:2], texts[:2])  # two updates: torchmetrics averages over all pairs
    metric.update(images[2:], texts[2:])
    return metric.compute().item()


def test_clip_score_matches_torchmetrics_on_the_same_model_and_inputs(hf_clip) -> None:
    model, processor = hf_clip
    ours_ids = open_clip.tokenizer.SimpleTokenizer()
    assert processor.tokenizer(SHORT).input_ids == [[ours_ids.sot_token_id, *ours_ids.encode(t), ours_ids.eot_token_id]
                                                     for t in SHORT]  # the same token ids on both sides
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ours = _ours(model, images, SHORT)
    assert ours.mean().item() > 5.0  # a positive mean: torchmetrics' clamp at 0 does not apply
    assert ours.std().item() > 0.01  # pairs differ: not a constant
    reference = _torchmetrics(model, processor, images, SHORT)
    assert reference == pytest.approx(ours.mean().item(), abs=1e-4)


def test_a_negative_mean_is_kept_where_torchmetrics_clamps_it_to_zero(hf_clip) -> None:
    model, processor = hf_clip
    flipped = type(model)(model.config).eval()
    flipped.load_state_dict(model.state_dict())
    with torch.no_grad():
        flipped.text_model.final_layer_norm.bias.neg_()  # texts now point away from images
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    ours = _ours(flipped, images, SHORT).mean().item()
    assert ours < -5.0
    assert _torchmetrics(flipped, processor, images, SHORT) == 0.0  # max(mean, 0)
