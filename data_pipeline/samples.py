"""Turn a raw tar group into a decoded sample dict, or into the reason it was skipped."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from data_pipeline import shard_io
from data_pipeline.ground_truth import (
    GroundTruthAccess, allowed_members, filter_metadata, is_curated, is_ground_truth_member,
)

NOT_CURATED = "not_curated"  # a filter, not a fault: the sample may not be read by this stage
JSON_PREFIX = "json."


@dataclass(frozen=True)
class SampleSpec:
    """What a stage reads from each sample.

    Attributes:
        gt_access: what ground truth the stage may see (required: no stage gets it by default).
        image: decode the image member (jpg/jpeg/png/webp) into ``sample["image"]`` (PIL RGB).
        captions: text sources that must exist and be non-empty: a member extension
            (``txt``, ``dsc.txt``) or a metadata field (``json.gt_dsc``).
        optional_texts: text sources decoded when present (``""`` otherwise).
        binary: members that must exist, passed as raw bytes (``cache.safetensors``).
    """

    gt_access: GroundTruthAccess
    image: bool = True
    captions: tuple[str, ...] = ()
    optional_texts: tuple[str, ...] = ()
    binary: tuple[str, ...] = ()

    def needs_curated(self) -> bool:
        """Whether a required caption is ground truth (a ``json.gt_*`` field or a ``gt_*`` member),
        which CURATED_CAPTIONS may read on curated samples only."""
        return any(s.startswith(JSON_PREFIX + "gt_") or is_ground_truth_member(s) for s in self.captions)


def _text(source: str, members: dict[str, bytes], meta: dict[str, Any]) -> str | None:
    if source.startswith(JSON_PREFIX):
        value = meta.get(source[len(JSON_PREFIX):])
        return value if isinstance(value, str) else None
    data = members.get(source)
    return None if data is None else shard_io.decode_text(data)


def decode_sample(raw: shard_io.RawSample, spec: SampleSpec,
                  max_image_pixels: int = shard_io.DEFAULT_MAX_IMAGE_PIXELS) -> dict[str, Any] | str:
    """Decode ``raw`` per ``spec``: a dict with ``__key__``, ``json`` (filtered metadata),
    ``image`` and one entry per text source; or the skip reason (a shard_io fault or
    NOT_CURATED). Cheap checks run before the image is decoded.
    """
    if raw.fault:
        return raw.fault
    members = raw.members
    meta: dict[str, Any] = {}
    if "json" in members:
        parsed = shard_io.decode_json(members["json"])
        if parsed is None:
            return shard_io.BAD_JSON
        meta = parsed
    if spec.gt_access is GroundTruthAccess.CURATED_CAPTIONS and spec.needs_curated() and not is_curated(meta):
        return NOT_CURATED
    visible = {ext: members[ext] for ext in allowed_members(list(members), spec.gt_access, is_curated(meta))}
    meta = filter_metadata(meta, spec.gt_access)
    sample: dict[str, Any] = {"__key__": raw.key, "json": meta}
    for source in spec.captions:
        text = _text(source, visible, meta)
        if text is None:
            return shard_io.MISSING_CAPTION
        if not text.strip():
            return shard_io.EMPTY_CAPTION
        sample[source] = text
    for source in spec.optional_texts:
        sample[source] = _text(source, visible, meta) or ""
    for ext in spec.binary:
        if ext not in visible:
            return shard_io.MISSING_MEMBER
        sample[ext] = visible[ext]
    if spec.image:
        ext = shard_io.image_member(visible)
        if ext is None:
            return shard_io.MISSING_IMAGE
        if not visible[ext]:
            return shard_io.EMPTY_IMAGE
        try:
            sample["image"] = shard_io.decode_image(visible[ext], max_image_pixels)
        except shard_io.ImageTooLarge:
            return shard_io.IMAGE_TOO_LARGE
        except ValueError:
            return shard_io.UNDECODABLE_IMAGE
    return sample
