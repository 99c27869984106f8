"""Who may read the toy world's ground truth.

The synthetic scenes carry exact answers (``gt_ssc``, ``gt_dsc``, ``objects``, ``text``,
``background``) so captioners and generators can be *evaluated*. Training on them would be
cheating, except for the small ``curated`` subset that stands in for the paper's hand-labelled
fine-tuning sets. Every reader is built with an explicit access level (no default) and drops
what that level may not see inside the worker, before a sample reaches the stage.
"""

from __future__ import annotations

import enum
from typing import Any

GT_CAPTION_FIELDS = ("gt_ssc", "gt_dsc")
GT_FIELDS = (*GT_CAPTION_FIELDS, "objects", "text", "background")
GT_MEMBER_PREFIX = "gt_"  # members like KEY.gt_dsc.txt are ground truth too


class GroundTruthAccess(enum.Enum):
    """What a stage may read.

    NONE: training stages (captioner pretraining, VAE, diffusion, recaptioning inputs).
    CURATED_CAPTIONS: captioner fine-tuning; gt_ssc/gt_dsc of samples marked curated only.
    EVALUATION: evaluation stages on held-out data; everything.
    """

    NONE = "none"
    CURATED_CAPTIONS = "curated_captions"
    EVALUATION = "evaluation"


def is_curated(meta: dict[str, Any]) -> bool:
    return meta.get("curated") is True


def filter_metadata(meta: dict[str, Any], access: GroundTruthAccess) -> dict[str, Any]:
    """A copy of a sample's json metadata with the fields ``access`` may not see removed."""
    if access is GroundTruthAccess.EVALUATION:
        return dict(meta)
    keep_captions = access is GroundTruthAccess.CURATED_CAPTIONS and is_curated(meta)
    allowed = set(GT_CAPTION_FIELDS) if keep_captions else set()
    return {k: v for k, v in meta.items() if k not in GT_FIELDS or k in allowed}


def is_ground_truth_member(extension: str) -> bool:
    """Whether a tar member extension (``gt_dsc.txt``) holds ground truth."""
    return extension.startswith(GT_MEMBER_PREFIX)


def allowed_members(extensions: list[str], access: GroundTruthAccess, curated: bool) -> list[str]:
    """Member extensions a stage may see for one sample."""
    if access is GroundTruthAccess.EVALUATION or (access is GroundTruthAccess.CURATED_CAPTIONS and curated):
        return list(extensions)
    return [e for e in extensions if not is_ground_truth_member(e)]
