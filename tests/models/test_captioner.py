"""CoCa building, the shortened training forward, and export to open_clip's formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch

from data_pipeline.transforms import CaptionPairs
from models.caption_decoding import DecodingOptions, decode_text, generate_tokens
from models.captioner import (CONFIG_FILE, EOT_ID, SOT_ID, WEIGHTS_FILE, CaptionerTraining, build_captioner,
                              caption_loss, export_captioner, image_transform, load_exported, tokenizer)
from tests.helpers import TINY_COCA as ARCH
from tests.helpers import run_without_recap
from train.captioning.coca_training import contrastive_only_parameters

# A user with open_clip and transformers only (tests/helpers.py blocks this repository): the export,
# its tokenizer and preprocessing, and greedy generate on one image file.
CAPTION_SCRIPT = r"""
import sys
import transformers
transformers.BeamSearchScorer = None  # else open_clip 3.3 turns generate off under transformers 5 (docs/captioner.md)
import open_clip, torch
from PIL import Image
folder, image_file, out = sys.argv[1:4]
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + folder)
tokenizer = open_clip.get_tokenizer("local-dir:" + folder)
image = preprocess(Image.open(image_file)).unsqueeze(0)
with torch.no_grad():
    generated = model.eval().generate(image, generation_type="top_k", top_k=1, seq_len=12, min_seq_len=4)
torch.save({"image": image, "generated": generated, "text": open_clip.decode(generated[0]),
            "tokenizer": type(tokenizer).__name__, "ids": tokenizer(["a red circle"])}, out)
"""
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


@pytest.mark.parametrize("contrastive_weight", [1.0, 0.0])
def test_short_decoder_loss_equals_open_clip_full_forward(coca: open_clip.CoCa, contrastive_weight: float) -> None:
    """Our forward (decoder cut to the longest caption, contiguous cross-entropy; without the
    contrastive term the text tower cut too) gives open_clip's CoCaLoss over its own full-context
    forward: same values, same gradients."""
    texts = tokenizer(coca)(CAPTIONS)
    assert texts.shape == (4, 76) and (texts[:, 0] == SOT_ID).all() and (texts == EOT_ID).sum() == 4
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    coca.zero_grad()  # the fixture is shared
    ours = CaptionerTraining(coca, caption_loss(contrastive_weight=contrastive_weight, caption_weight=2.0))(images,
                                                                                                         texts)
    ours["loss"].backward()
    our_grads = {n: p.grad.clone() for n, p in coca.named_parameters() if p.grad is not None}
    coca.zero_grad()
    full = coca(images, texts)  # open_clip's own forward over the whole context
    reference = open_clip.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=contrastive_weight, pad_id=0)
    contrastive, caption = reference(full["image_features"], full["text_features"], full["logits"], full["labels"],
                                     full["logit_scale"])
    (contrastive + caption).backward()
    assert ours["contrastive"].item() == pytest.approx(contrastive.item(), rel=1e-6)
    assert ours["caption"].item() == pytest.approx(caption.item(), rel=1e-5)
    assert ours["loss"].item() == pytest.approx((contrastive + caption).item(), rel=1e-5)
    assert len(our_grads) > 50
    for name, param in coca.named_parameters():
        if name in our_grads:
            torch.testing.assert_close(our_grads[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert param.grad is None or not param.grad.any(), name


def test_caption_loss_weights_and_padding() -> None:
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([[4, 2, 0, 0, 0], [1, 1, 1, 7, 0], [3, 0, 0, 0, 0]])
    feats = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(4)), dim=-1)
    scale = torch.tensor(10.0)
    _, caption = caption_loss(contrastive_weight=0.0, caption_weight=3.0)(feats, feats, logits, labels, scale)
    keep = labels != 0  # 7 real tokens; pads count for nothing
    expected = -torch.log_softmax(logits, dim=-1)[keep].gather(1, labels[keep][:, None]).mean() * 3.0
    assert caption.item() == pytest.approx(expected.item(), rel=1e-6)
    contrastive, _ = caption_loss(contrastive_weight=0.5, caption_weight=1.0)(feats, feats, logits, labels, scale)
    clip = open_clip.ClipLoss()(feats, feats, scale)
    assert contrastive.item() == pytest.approx(0.5 * clip.item(), rel=1e-6)


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


def test_gradient_checkpointing_keeps_loss_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_captioner("coca_test", ARCH)
    texts = tokenizer(model)(CAPTIONS)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    training = CaptionerTraining(model, caption_loss(contrastive_weight=1.0, caption_weight=2.0)).train()
    results = []
    for enabled in (False, True):
        model.set_grad_checkpointing(enabled)
        model.zero_grad()
        out = training(images, texts)
        out["loss"].backward()
        results.append((out["loss"].item(), {n: p.grad.clone() for n, p in model.named_parameters()
                                             if p.grad is not None}))
    assert model.visual.transformer.grad_checkpointing and model.text_decoder.grad_checkpointing
    (plain, plain_grads), (checkpointed, ckpt_grads) = results
    assert checkpointed == pytest.approx(plain, rel=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK"])
def test_split_transform_equals_open_clips_bit_for_bit(mode: str) -> None:
    """pixels() in a worker + normalize() on the batch == image_transform(model) per image."""
    from PIL import Image

    from models.captioner import SplitImageTransform, image_transform

    model = build_captioner("coca_ViT-B-32", ARCH)
    split, reference = SplitImageTransform(model), image_transform(model)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
              for h, w in [(37, 91), (32, 32), (300, 20), (7, 7)]]
    pixels = torch.stack([split.pixels(img) for img in images])
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 32, 32)
    assert torch.equal(split.normalize(pixels), torch.stack([reference(img) for img in images]))


def test_export_captions_in_plain_open_clip_without_recap(tmp_path: Path) -> None:
    from PIL import Image

    torch.manual_seed(0)
    model = build_captioner("coca_test", ARCH).eval()
    with torch.no_grad():  # a random model: EOT and pad pushed down, so its caption has some length
        model.text_decoder.text_projection[:, [EOT_ID, 0]] -= 0.5
    export_captioner(model, ARCH, tmp_path / "captioner", "coca_test")
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "image.png")
    result = run_without_recap(CAPTION_SCRIPT, ["captioner", "image.png", "out.pt"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert theirs["tokenizer"] == "SimpleTokenizer" and torch.equal(theirs["ids"], tokenizer(model)(["a red circle"]))
    assert torch.equal(theirs["image"], image_transform(model)(Image.open(tmp_path / "image.png")).unsqueeze(0))
    row = theirs["generated"][0].tolist()
    assert row[0] == SOT_ID and row[-1] == EOT_ID and len(row) == 12  # forced to end at seq_len
    ours = generate_tokens(model, theirs["image"], DecodingOptions(max_length=12, min_length=4))
    assert ours == [row[1:-1]]  # our greedy decoder, token for token
    text = decode_text(ours[0], open_clip.tokenizer.SimpleTokenizer())
    assert len(text) > 10 and theirs["text"] == f"<start_of_text>{text} <end_of_text>"
