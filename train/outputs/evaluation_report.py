"""evaluation.md of `recap evaluate`: evaluation.json as a markdown table and a line on each judge."""

from __future__ import annotations

from typing import Any

from models.attribute_probe import ATTRIBUTES
from train.outputs.markdown import cell

ROWS = ("generated_from_alt_text", "generated_from_dsc", "real", "vae_round_trip", "majority_class")
_LABELS = {"generated_from_alt_text": ("generated", "alt-text"), "generated_from_dsc": ("generated", "DSC"),
           "real": ("real (ceiling)", "–"), "vae_round_trip": ("real through the VAE", "–"),
           "majority_class": ("majority class (floor)", "–")}  # first two cells


def markdown_report(evaluation: dict[str, Any]) -> str:
    """evaluation.json as a markdown table (one row per image set) and a line on each judge."""
    results = evaluation["results"]
    attributes = judged_attributes(results["real"].get("attributes", {}))
    head = ["images", "prompted with", "CLIP vs alt-text", "CLIP vs DSC", "CLIP vs other DSC"]
    head += [*attributes, "attributes (mean)"] if attributes else []
    lines = [f"# Evaluation: {evaluation['samples']} held-out samples, {evaluation['size']} px", "",
             f"Generator `{evaluation['generator']['pipeline']}` ({evaluation['generator']['weights']} weights, "
             f"{evaluation['generator']['scheduler']} x {evaluation['generator']['steps']}, guidance "
             f"{evaluation['generator']['guidance_scale']}); CLIP judge `{evaluation['clip']}`; CLIP score = mean of "
             "100 x cosine (docs/evaluation.md).", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for row in ROWS:
        if row not in results:
            continue
        r = results[row]
        cells = [*_LABELS[row], cell(r.get("clip_score_alt_text"), 2), cell(r.get("clip_score_dsc"), 2),
                 cell(r.get("clip_score_other_dsc"), 2)]
        if attributes:
            cells += [cell(r.get("attributes", {}).get(k), 3) for k in (*attributes, "mean")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *judge_lines(evaluation["judges"])]
    return "\n".join(lines) + "\n"


def judged_attributes(scores: dict[str, float]) -> list[str]:
    """The probe attributes present in ``scores``, in ``ATTRIBUTES`` order (a probe has heads only
    for what varies in its world)."""
    return [name for name in ATTRIBUTES if name in scores]


def judge_lines(judges: dict[str, Any]) -> list[str]:
    """One sentence per judge with known accuracy (train-eval-clip's judge_accuracy.json): how far
    its numbers can be trusted."""
    out = []
    clip, probe = judges.get("clip"), judges.get("probe")
    if clip is not None:
        c = clip["clip"]
        out.append(f"Judge CLIP on {clip['samples']} real held-out images (train-eval-clip): top-1 retrieval among "
                   f"{c['retrieval_candidates']} image->text {c['image_to_text_top1']:.3f}, text->image "
                   f"{c['text_to_image_top1']:.3f} (chance {c['chance']:.3f}); CLIP score matched "
                   f"{c['clip_score_matched']:.1f} vs mismatched {c['clip_score_mismatched']:.1f}.")
    if probe is not None:
        p = probe["probe"]
        scores = ", ".join(f"{k} {p['accuracy'][k]:.3f} ({p['majority_baseline'][k]:.3f})"
                           for k in judged_attributes(p["accuracy"]))
        out.append(f"Judge probe on {probe['samples']} real held-out images: accuracy (majority class) {scores}.")
    return out
