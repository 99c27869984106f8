"""The attribute probe: targets from the toy ground truth json, head shapes, accuracy, save/load."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data_pipeline.toy_captions import main_subject
from data_pipeline.toy_scenes import POSITIONS, SHAPES, WORLDS, sample_scene, scene_ground_truth, shape_mask
from models.attribute_probe import (
    ATTRIBUTES, CLASSES, MIRRORED_POSITION, NO_WORD, AttributeProbe, ProbeSpec, binding_accuracy, load_probe,
    main_object, majority_classes, mirror_scenes, predict, probe_loss, probe_targets, save_probe, stack_targets, varying_attributes,
)


def _obj(shape: str, colour: str, texture: str, box: list[int], size: str = "medium", position: str = "center") -> dict:
    return {"shape": shape, "colour": colour, "size": size, "texture": texture, "position": position, "box": box}


def _spec(size: int = 32, attributes: tuple[str, ...] = ATTRIBUTES) -> ProbeSpec:
    return ProbeSpec(image_size=size, channels=(8, 16), attributes=attributes,
                     classes={name: CLASSES[name] for name in attributes}, majority={name: 0 for name in attributes})


def test_targets_name_the_main_subject_the_count_and_the_word() -> None:
    truth = {"objects": [_obj("circle", "red", "solid", [0, 0, 10, 10]),
                         _obj("star", "blue", "striped", [20, 20, 40, 40], "large", "top left"),  # the largest box
                         _obj("heart", "pink", "dotted", [50, 0, 60, 10])],
             "text": {"word": "apple", "colour": "green", "box": [0, 50, 30, 60]}, "background": "white"}
    t = probe_targets(truth)
    assert {name: CLASSES[name][t[name]] for name in ATTRIBUTES} == {
        "colour": "blue", "shape": "star", "size": "large", "position": "top left", "count": "3", "texture": "striped",
        "word": "apple"}
    no_word = probe_targets({**truth, "text": None, "objects": truth["objects"][:1]})
    assert CLASSES["word"][no_word["word"]] == NO_WORD and no_word["word"] == 0
    assert CLASSES["count"][no_word["count"]] == "1" and CLASSES["shape"][no_word["shape"]] == "circle"


@pytest.mark.parametrize("world", sorted(WORLDS))
def test_main_object_is_toy_captions_main_subject_on_sampled_scenes(world: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        scene = sample_scene(rng, world=WORLDS[world])
        truth = json.loads(json.dumps(scene_ground_truth(scene)))  # as read back from KEY.json
        main = main_subject(scene)
        assert main_object(truth["objects"])["box"] == list(main.box)
        t = probe_targets(truth)
        assert {name: CLASSES[name][t[name]] for name in ("colour", "shape", "size", "position", "texture")} == {
            "colour": main.colour, "shape": main.shape, "size": main.size, "position": main.position,
            "texture": main.texture}
        assert int(CLASSES["count"][t["count"]]) == len(scene.objects)
    tie = [_obj("circle", "red", "solid", [0, 0, 10, 10]), _obj("star", "blue", "solid", [20, 20, 30, 30])]
    assert main_object(tie)["shape"] == "circle"  # equal areas: the first


@pytest.mark.parametrize("truth", [{"caption": "web data, no ground truth"}, {"objects": [], "text": None},
                                   {"objects": [_obj("circle", "red", "solid", [0, 0, 1, 1])] * 5, "text": None}])
def test_targets_refuse_what_is_not_toy_ground_truth(truth: dict) -> None:
    with pytest.raises(ValueError, match="toy ground truth"):
        probe_targets(truth)


def test_heads_have_one_logit_per_class_at_any_input_size() -> None:
    torch.manual_seed(0)
    probe = AttributeProbe(_spec()).eval()
    logits = probe(torch.rand(3, 3, 32, 32))
    assert {name: tuple(v.shape) for name, v in logits.items()} == {
        "colour": (3, 8), "shape": (3, 8), "size": (3, 3), "position": (3, 9), "count": (3, 4), "texture": (3, 3),
        "word": (3, 47)}
    predicted = predict(probe, torch.rand(2, 3, 48, 80))  # resized to 32 x 32 inside
    assert {name: (tuple(v.shape), v.dtype) for name, v in predicted.items()} == {
        name: ((2,), torch.int64) for name in ATTRIBUTES}
    targets = stack_targets([{name: k for name in ATTRIBUTES} for k in (1, 2, 0)])
    expected = sum(F.cross_entropy(logits[name], targets[name]) for name in ATTRIBUTES) / len(ATTRIBUTES)
    assert probe_loss(logits, targets).item() == pytest.approx(expected.item())


def test_binding_accuracy_and_majority_on_known_labels() -> None:
    targets = {name: torch.tensor([0, 1, 1, 2]) for name in ATTRIBUTES}
    predicted = {**{name: torch.tensor([0, 1, 1, 2]) for name in ATTRIBUTES}, "shape": torch.tensor([0, 0, 0, 0]),
                 "word": torch.tensor([2, 2, 2, 2])}
    acc = binding_accuracy(predicted, targets)
    assert acc == {"colour": 1.0, "shape": 0.25, "size": 1.0, "position": 1.0, "count": 1.0, "texture": 1.0,
                   "word": 0.25, "mean": pytest.approx((5 + 0.25 + 0.25) / 7)}
    assert majority_classes(targets) == {name: 1 for name in ATTRIBUTES}
    # Only the probe's heads are scored: a constant attribute would inflate the mean.
    assert binding_accuracy({"shape": predicted["shape"]}, targets) == {"shape": 0.25, "mean": 0.25}


def test_heads_only_for_attributes_that_vary_and_position_is_seen() -> None:
    """A shapes-world probe has no texture or word head; its heads read the flattened feature map,
    so two images differing only by where the object is can get different positions."""
    rng = np.random.default_rng(1)
    truths = [json.loads(json.dumps(scene_ground_truth(sample_scene(rng, text_probability=0.0,
                                                                     world=WORLDS["shapes"])))) for _ in range(200)]
    attributes = varying_attributes(stack_targets([probe_targets(t) for t in truths]))
    assert attributes == ("colour", "shape", "size", "position", "count")
    probe = AttributeProbe(dataclasses.replace(_spec(32, attributes), stem=4)).eval()
    assert set(probe.heads) == set(attributes) and probe.spec.grid == 8
    assert probe.trunk[0][0].stride == (1, 1) and probe.trunk[0][0].out_channels == 4
    assert probe.heads["position"].in_features == 16 * (2 + 64)
    left, right = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    left[..., 4:12, 2:10], right[..., 4:12, 22:30] = 1.0, 1.0  # the same square, moved
    torch.manual_seed(0)
    logits = probe(torch.cat([left, right]))
    assert not torch.allclose(logits["position"][0], logits["position"][1])


def test_save_and_load_give_the_same_predictions(tmp_path) -> None:
    torch.manual_seed(0)
    probe = AttributeProbe(_spec()).eval()
    images = torch.rand(4, 3, 32, 32)
    folder = save_probe(probe, tmp_path / "probe")
    loaded = load_probe(folder)
    assert loaded.spec == probe.spec
    for name, value in probe(images).items():
        assert torch.equal(value, loaded(images)[name]), name
    with pytest.raises(FileNotFoundError, match="not a saved attribute probe"):
        load_probe(tmp_path / "missing")
    config = json.loads((folder / "probe.json").read_text())
    assert config["attributes"] == list(ATTRIBUTES)
    config["classes"]["colour"] = config["classes"]["colour"][:-1]
    (folder / "probe.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="classes differ"):
        load_probe(folder)


def test_mirroring_flips_the_chosen_images_and_their_position_column_but_no_word() -> None:
    images = torch.rand(4, 3, 8, 8)
    word = {name: CLASSES["word"].index(name) for name in (NO_WORD, "apple")}
    targets = {"position": torch.tensor([POSITIONS.index(p) for p in ("top left", "center", "bottom right", "left")]),
               "colour": torch.tensor([1, 2, 3, 4]),
               "word": torch.tensor([word[NO_WORD], word[NO_WORD], word[NO_WORD], word["apple"]])}
    flip = torch.tensor([True, True, False, True])
    mirrored, new = mirror_scenes(images, targets, flip)
    assert torch.equal(mirrored[:2], images[:2].flip(-1)) and torch.equal(mirrored[2:], images[2:])  # 4th: a word
    assert [POSITIONS[i] for i in new["position"]] == ["top right", "center", "bottom right", "left"]
    assert torch.equal(new["colour"], targets["colour"]) and torch.equal(new["word"], targets["word"])
    assert [POSITIONS[i] for i in MIRRORED_POSITION] == ["top right", "top", "top left", "right", "center", "left",
                                                         "bottom right", "bottom", "bottom left"]


@pytest.mark.parametrize("shape", SHAPES)
def test_every_shape_is_its_own_mirror_image_up_to_rasterisation(shape: str) -> None:
    """What mirroring the probe's training scenes assumes: a mirrored shape is the same shape (its
    mask and its mirror differ only in edge pixels of the polygon fill)."""
    mask = np.array(shape_mask(shape, 48)) > 0
    assert (mask != mask[:, ::-1]).sum() < 0.15 * mask.sum()
