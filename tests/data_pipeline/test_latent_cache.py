"""latent_cache's conditioning file: where it lies beside the shards, and its bytes round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save

from data_pipeline.latent_cache import conditioning_url, decode_conditioning, encode_conditioning


@pytest.mark.parametrize("shard, expected", [
    ("/data/cache/00007.tar", "/data/cache/conditioning.safetensors"),
    ("https://host/cache/00007.tar", "https://host/cache/conditioning.safetensors"),
    ("pipe:aws s3 cp s3://bucket/cache/00007.tar -", "pipe:aws s3 cp s3://bucket/cache/conditioning.safetensors -"),
])
def test_the_conditioning_file_lies_beside_the_first_shard(shard: str, expected: str) -> None:
    assert conditioning_url(shard) == expected


def test_conditioning_bytes_round_trip_with_their_metadata_and_are_deterministic() -> None:
    tensors = {"empty_states": torch.randn(1, 8), "empty_mask": torch.ones(1, dtype=torch.bool)}
    about = {"prompts": ["a red circle"], "max_tokens": 24, "text_encoder": "architecture"}
    data = encode_conditioning(tensors, about)
    assert encode_conditioning(dict(reversed(tensors.items())), dict(reversed(about.items()))) == data
    got, got_about = decode_conditioning(data)
    assert got_about == about and got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in tensors)
    with pytest.raises(ValueError, match=r"^not a cache conditioning file \(KeyError\)$"):
        decode_conditioning(save(tensors))  # no recap metadata
    with pytest.raises(ValueError, match=r"^not a cache conditioning file"):
        decode_conditioning(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage")
