"""CoCa building, the shortened training forward, and export to open_clip's formats."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from data_pipeline.transforms import CaptionPairs
from models.captioner import (CONFIG_FILE, EOT_ID, SOT_ID, WEIGHTS_FILE, CaptionerTraining, build_captioner,
                              caption_loss, export_captioner, image_transform, load_exported, tokenizer)
from tests.helpers import TINY_COCA as ARCH
from train.captioner_training import contrastive_only_parameters

CAPTIONS = ["a red circle", "two shapes: a large blue dotted hexagon and a small green star on a beige background",
            "IMG_4821.jpg", "the word \"apple\" is written in pink"]


@pytest.fixture(scope="module")
def coca() -> open_clip.CoCa:
    torch.manual_seed(0)
    return build_captioner("coca_test", ARCH)


def test_decoder_projection_is_initialised(coca: open_clip.CoCa) -> None:
    # open_clip leaves it as torch.empty; ours is N(0, width**-0.5)
    projection = coca.text_decoder.text_projection
    assert torch.isfinite(projection).all()
    assert projection.std().item() == pytest.approx(32 ** -0.5, rel=0.05)


def test_invalid_architecture_and_missing_checkpoint_are_clear() -> None:
    bad = {**ARCH, "multimodal_cfg": {**ARCH["multimodal_cfg"], "width": 48}}
    with pytest.raises(ValueError, match="multimodal_cfg.width must equal embed_dim"):
        build_captioner("coca_bad", {**bad, "vision_cfg": {**ARCH["vision_cfg"], "attn_pooler_heads": 3}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_captioner("coca_test", ARCH, pretrained="/nonexistent/open_clip_model.safetensors")
    with pytest.raises(ValueError, match="not an open_clip CoCa config"):
        build_captioner("ViT-B-32")


def test_short_decoder_loss_equals_open_clip_full_forward(coca: open_clip.CoCa) -> None:
    texts = tokenizer(coca)(CAPTIONS)
    assert texts.shape == (4, 76) and (texts[:, 0] == SOT_ID).all() and (texts == EOT_ID).sum() == 4
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    loss = caption_loss(contrastive_weight=1.0, caption_weight=2.0)
    ours = CaptionerTraining(coca, loss)(images, texts)
    full = coca(images, texts)  # open_clip's own forward over the whole context
    contrastive, caption = loss(full["image_features"], full["text_features"], full["logits"], full["labels"],
                                full["logit_scale"])
    assert ours["contrastive"].item() == pytest.approx(contrastive.item(), rel=1e-6)
    assert ours["caption"].item() == pytest.approx(caption.item(), rel=1e-5)
    assert ours["loss"].item() == pytest.approx((contrastive + caption).item(), rel=1e-5)


def test_export_loads_in_open_clip_both_ways(coca: open_clip.CoCa, tmp_path: Path) -> None:
    export_captioner(coca, ARCH, tmp_path, "coca_test")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "coca_test.json"])
    open_clip.add_model_config(tmp_path / "coca_test.json")
    by_name, _, _ = open_clip.create_model_and_transforms("coca_test", pretrained=str(tmp_path / WEIGHTS_FILE))
    by_dir, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    ours = load_exported(tmp_path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = tokenizer(coca)(CAPTIONS[:2])
    coca.eval()
    with torch.no_grad():
        reference = coca(images, texts)
        for model in (by_name.eval(), by_dir.eval(), ours):
            out = model(images, texts)
            for key in ("image_features", "text_features", "logits"):
                assert torch.equal(out[key], reference[key]), key
    assert preprocess.transforms[0].size == (32, 32)  # squash: the whole picture, any aspect


def test_caption_only_training_freezes_the_contrastive_head(coca: open_clip.CoCa) -> None:
    names = {id(p): n for n, p in coca.named_parameters()}
    frozen = sorted(names[id(p)] for p in contrastive_only_parameters(coca))
    assert frozen == ["logit_scale", "text.cls_emb", "text.ln_final.bias", "text.ln_final.weight",
                      "text.text_projection", "visual.proj"]


def test_caption_pairs_transform(coca: open_clip.CoCa) -> None:
    from PIL import Image

    pairs = CaptionPairs(image_transform(coca), tokenizer(coca), "json.gt_dsc")
    image, tokens = pairs({"image": Image.new("RGB", (64, 32), (255, 0, 0)), "json.gt_dsc": CAPTIONS[1], "seed": 3})
    assert image.shape == (3, 32, 32) and tokens.shape == (76,)
    assert torch.equal(tokens, tokenizer(coca)([CAPTIONS[1]])[0])
