"""Stand-ins for the four sets of pretrained weights a production run reads, and its input shards.

`recap ... experiment=dalle3_256` loads T5-XXL, the SD VAE, an open_clip CoCa and OpenAI's CLIP
ViT-B/32 from local disk (docs/real-run.md). None of them can be downloaded here, and none of them
fits a CPU test, so this module writes substitutes with random weights, each saved by the library
that wrote the real one and in the folder layout the real download has:

- T5: a tiny ``T5ForConditionalGeneration`` (google/t5-v1_1-xxl is the whole encoder-decoder, so
  the decoder weights the stages read past are there too) saved with transformers'
  ``save_pretrained``, its config shaped like v1.1's (gated-gelu, untied embeddings, a model
  vocabulary rounded up past the tokenizer's as 32128 is past 32100), and a ``T5Tokenizer``
  (transformers 5: the `tokenizers`-backed one) over a Unigram vocabulary trained offline with the
  `tokenizers` library, 100 sentinel ids included, saved with ``save_pretrained``;
- VAE: diffusers' ``AutoencoderKL`` with SD's four levels (8x downsampling), latent channels and
  scaling factor but narrow blocks, saved with diffusers' ``save_pretrained``;
- CoCa: a named open_clip CoCa, its state dict saved as open_clip's hub export saves one
  (``torch.save`` to open_clip_pytorch_model.bin, beside open_clip_config.json). By default
  ``coca_ViT-B-32-test-small``: coca_ViT-B-32's config with narrow, shallow towers (6.8 M
  parameters, open_clip's vocabulary and context), registered with open_clip from a config folder
  (tests/production/startup/sitecustomize.py does it in the stage processes). ``full_size_coca``:
  open_clip's own ``coca_ViT-B-32`` (253 M parameters; minutes per stage on a CPU, ~4 GB per
  training process);
- CLIP judge: open_clip's ``ViT-B-32-quickgelu`` at full size, saved the same way as
  open_clip_model.safetensors (the file the preset's `evaluate.clip.pretrained` names).

The shards are the toy generator's, which writes img2dataset's layout (``NNNNN.tar`` of
``KEY.jpg/.txt/.json`` and ``NNNNN_stats.json``). Training shards keep the toy fields: half the
samples are curated, with the ``gt_ssc``/``gt_dsc`` fields fine-tuning reads (a production run
adds them to its curated samples, docs/real-run.md). The held-out shards keep img2dataset's
fields only, as a production held-out set has: evaluate's DSC references must come from
recaptioning them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from data_pipeline.options import ToyDataOptions
from data_pipeline.toy_shards import write_toy_dataset

# Big enough for 2 ranks x 1 reader worker, each with curated samples to fine-tune on.
DATA = ToyDataOptions(train_shards=4, heldout_shards=2, samples_per_shard=4, curated_fraction=0.5, world="shapes",
                      seed=11, processes=1)
T5_VOCABULARY = 400  # Unigram pieces before T5Tokenizer adds its 100 sentinels
T5_SHAPE = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 1, "num_heads": 4}
VAE_CHANNELS = (8, 16, 16, 16)  # SD's four levels (128, 256, 512, 512), narrow
FULL_COCA, SMALL_COCA, CLIP = "coca_ViT-B-32", "coca_ViT-B-32-test-small", "ViT-B-32-quickgelu"
# coca_ViT-B-32 but narrow and shallow; the vocabulary, context and structure stay open_clip's.
SMALL_COCA_SIZES = {"embed_dim": 64,
                    "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16,
                                   "attn_pooler_heads": 4},
                    "text_cfg": {"width": 64, "heads": 4, "layers": 2},
                    "multimodal_cfg": {"width": 64, "heads": 4, "layers": 2, "attn_pooler_heads": 4}}
# img2dataset's KEY.json fields (tests/data_pipeline/test_img2dataset_layout.py); the toy adds ground truth
IMG2DATASET_FIELDS = ("url", "caption", "key", "status", "error_message", "width", "height", "original_width",
                      "original_height", "exif", "sha256")


@dataclass(frozen=True)
class Substitutes:
    """Where everything was written (the preset's paths under one root)."""

    t5: Path
    vae: Path
    coca_name: str  # captioner.model_name
    coca: Path
    open_clip_configs: Path  # the folder registered with open_clip (RECAP_OPEN_CLIP_CONFIGS)
    clip: Path
    train: Path
    heldout: Path


def write_substitutes(root: Path, *, full_size_coca: bool = False) -> Substitutes:
    """Write the weights under ``root``/models and the shards under ``root``/data; returns the paths.
    Deterministic: the same root gets the same files."""
    import open_clip

    torch.manual_seed(0)
    models = root / "models"
    configs = write_small_coca_config(models / "open_clip_configs")
    open_clip.add_model_config(configs)  # as the stage processes do (tests/production/startup)
    coca = FULL_COCA if full_size_coca else SMALL_COCA
    coca_file = models / "open_clip" / coca / "open_clip_pytorch_model.bin"
    out = Substitutes(t5=write_t5(models / "t5-v1_1-xxl", _corpus()), vae=write_vae(models / "sd-vae-ft-mse"),
                      coca_name=coca, coca=write_open_clip(coca, coca_file), open_clip_configs=configs,
                      clip=write_open_clip(CLIP, models / "clip-vit-b-32-openai" / "open_clip_model.safetensors"),
                      train=root / "data" / "train", heldout=root / "data" / "heldout")
    write_toy_dataset({"train": out.train, "heldout": out.heldout}, DATA, progress=False)
    for shard in sorted(out.heldout.glob("*.tar")):
        keep_img2dataset_fields(shard)
    return out


def write_small_coca_config(folder: Path) -> Path:
    """``folder``/coca_ViT-B-32-test-small.json: coca_ViT-B-32's open_clip config with SMALL_COCA_SIZES."""
    import open_clip

    config = open_clip.get_model_config(FULL_COCA)
    for key, value in SMALL_COCA_SIZES.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{SMALL_COCA}.json").write_text(json.dumps(config, indent=2))
    return folder


def keep_img2dataset_fields(shard: Path) -> None:
    """Rewrite ``shard`` with only img2dataset's fields in each KEY.json (no toy ground truth)."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".json"):
                meta = json.loads(data)
                data = json.dumps({k: meta[k] for k in IMG2DATASET_FIELDS}, indent=4).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def _corpus() -> list[str]:
    """Caption-like text for the T5 tokenizer: the toy world's words, and every ASCII character."""
    import string

    from data_pipeline.toy_scenes import COLOURS, SHAPES

    words = [f"a photo of a {c} {s} on a white background" for c in COLOURS for s in SHAPES]
    return [*words, "the red fox sits in snow looking at the camera", " ".join(string.printable.split())]


def write_t5(folder: Path, corpus: list[str]) -> Path:
    """A v1.1-shaped tiny T5 and its T5Tokenizer, in one Hugging Face folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    unigram.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=T5_VOCABULARY, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    pieces = [(piece, score) for piece, score in json.loads(unigram.to_str())["model"]["vocab"]]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=512)
    vocab_size = -(-len(tokenizer) // 128) * 128  # t5-v1_1: 32100 tokens, a 32128-row embedding
    config = T5Config(vocab_size=vocab_size, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, **T5_SHAPE)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_vae(folder: Path) -> Path:
    """An SD-shaped AutoencoderKL (4 levels, 4 latent channels, scaling factor 0.18215), narrow."""
    from diffusers import AutoencoderKL

    levels = len(VAE_CHANNELS)
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * levels,
                  up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=VAE_CHANNELS, layers_per_block=1,
                  norm_num_groups=8, sample_size=256, scaling_factor=0.18215).save_pretrained(folder)
    return folder


def write_open_clip(name: str, path: Path) -> Path:
    """open_clip model ``name`` at full size, random weights, as its hub export writes them: the
    state dict in ``path`` (.bin: torch.save; .safetensors: safetensors) and open_clip_config.json."""
    import open_clip
    from open_clip.push_to_hf_hub import save_config_for_hf
    from safetensors.torch import save_file

    model = open_clip.create_model(name)
    if isinstance(model, open_clip.CoCa):  # open_clip leaves this one torch.empty (whatever the heap held:
        width = model.text_decoder.width  # 1e31 after other tests ran in this process); as build_captioner does
        torch.nn.init.normal_(model.text_decoder.text_projection, std=width ** -0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    save_config_for_hf(model, path.parent / "open_clip_config.json", model_config=open_clip.get_model_config(name))
    return path
