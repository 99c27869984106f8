"""RecapPipeline: guidance, seeds, sizes, schedulers, and the diffusers-format export round trip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from transformers import T5EncoderModel

from data_pipeline.caption_tokenizer import load_tokenizer, train_caption_tokenizer
from models.diffusion import make_scheduler
from models.pipeline import RecapPipeline, export_pipeline, guided, pad_tokens
from models.text_conditioning import CaptionTransformer, build_t5_encoder, encode_captions
from models.unet import build_unet
from models.vae import build_vae
from tests.helpers import REPO, assert_close_to_scale, run_without_recap

TINY_T5 = {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 1, "num_heads": 2}
TINY_UNET = dict(block_out_channels=[32, 64], attention_levels=[False, True], layers_per_block=1,
                 attention_head_dim=8, cross_attention_dim=16, pooled_dim=16, norm_num_groups=32)
PROMPTS = ["a red cat on the left", "a big blue square"]
COLOURS, SHAPES, PLACES = ["red", "blue", "green", "small", "big"], ["circle", "square", "cat"], ["left", "right"]
STEPS = 4
TEXT_CONDITIONING = REPO / "models" / "text_conditioning.py"
# What a user with only diffusers and transformers runs (tests/helpers.py blocks this repository's
# packages): plain diffusers without trust_remote_code refuses, with it generates; the tokenizer
# folder reads with AutoTokenizer; a save from that pipeline carries the code on.
STANDALONE_SCRIPT = r"""
import sys
import torch
from diffusers import DiffusionPipeline
from transformers import AutoTokenizer
folder, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3].split("|")
try:
    DiffusionPipeline.from_pretrained(folder)
    refused = ""
except ValueError as exc:
    refused = str(exc)
pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
images = pipe(prompts, height=32, width=64, num_inference_steps=4, guidance_scale=3.0,
              generator=torch.Generator().manual_seed(9), output_type="pt")
tokenizer = AutoTokenizer.from_pretrained(folder + "/tokenizer")
pipe.save_pretrained(out + "/again")
torch.save({"refused": refused, "images": images, "ids": tokenizer(prompts).input_ids,
            "tokenizer": type(tokenizer).__name__, "max_tokens": tokenizer.model_max_length,
            "classes": [type(m).__module__ + "." + type(m).__name__ for m in (pipe, pipe.caption_transformer)]},
           out + "/out.pt")
"""


@pytest.fixture(scope="module")
def components() -> dict:
    texts = [f"a {c} {s} on the {p}" for c in COLOURS for s in SHAPES for p in PLACES]  # 30 captions
    tokenizer = train_caption_tokenizer(texts, vocab_size=200, max_tokens=16)
    torch.manual_seed(0)
    return dict(
        tokenizer=tokenizer,
        text_encoder=build_t5_encoder(pretrained=None, architecture=TINY_T5, vocab_size=len(tokenizer)),
        caption_transformer=CaptionTransformer(text_dim=32, width=16, layers=1, heads=2, pooled_dim=16).eval(),
        unet=build_unet(**TINY_UNET).eval(),
        vae=build_vae([32, 32, 32, 32], layers_per_block=1, norm_num_groups=16).eval(),
        scheduler=make_scheduler(prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=1000),
    )


def _pipe(components: dict, scheduler_class: type = DDPMScheduler) -> RecapPipeline:
    """A fresh pipeline (its own scheduler state) over the shared tiny modules."""
    scheduler = scheduler_class.from_config(components["scheduler"].config)
    pipe = RecapPipeline(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe: RecapPipeline, seed: int = 0, **kwargs) -> torch.Tensor:
    args = dict(height=32, width=64, num_inference_steps=STEPS, guidance_scale=1.0, output_type="pt")
    return pipe(PROMPTS, generator=torch.Generator().manual_seed(seed), **{**args, **kwargs})


def _settings(config) -> dict:
    """A config's values without diffusers' bookkeeping keys (``_use_default_values``, ...)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def exported(components, tmp_path_factory):
    return export_pipeline(tmp_path_factory.mktemp("export") / "recap", **components)


def test_pad_tokens_and_guided_are_the_formulas() -> None:
    tokens, mask = torch.ones(2, 3, 4), torch.tensor([[True, True, False], [True, True, True]])
    padded, padded_mask = pad_tokens(tokens, mask, 5)
    assert padded.shape == (2, 5, 4) and (padded[:, 3:] == 0).all() and torch.equal(padded[:, :3], tokens)
    assert padded_mask.tolist() == [[True, True, False, False, False], [True, True, True, False, False]]
    with pytest.raises(ValueError, match="cannot pad"):
        pad_tokens(tokens, mask, 2)
    noise = torch.cat([torch.full((1, 4, 2, 2), 1.0), torch.full((1, 4, 2, 2), 3.0)])  # [uncond; cond]
    assert torch.equal(guided(noise, 5.0), torch.full((1, 4, 2, 2), 11.0))  # 1 + 5 * (3 - 1)


def test_encode_prompts_masks_padding_and_truncates(components) -> None:
    pipe = _pipe(components)
    tokens, mask, pooled = pipe.encode_prompts(PROMPTS)
    ids = components["tokenizer"](PROMPTS).input_ids
    assert tokens.shape == (2, max(map(len, ids)), 16) and pooled.shape == (2, 16) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [len(i) for i in ids]
    assert (tokens[~mask] == 0).all()
    alone, alone_mask, alone_pooled = pipe.encode_prompts(PROMPTS[1:])  # the shorter caption, no padding
    n = int(alone_mask.sum())
    assert_close_to_scale(alone[0], tokens[1, :n], msg="tokens")
    assert_close_to_scale(alone_pooled[0], pooled[1], msg="pooled")
    short, short_mask, _ = pipe.encode_prompts(PROMPTS, max_tokens=3)
    assert short.shape[1] == 3 and short_mask.all()
    empty_tokens, empty_mask, _ = pipe.encode_prompts([""])
    assert empty_mask.tolist() == [[True]]  # the empty caption is "</s>" alone
    with pytest.raises(ValueError, match="list of captions"):
        pipe.encode_prompts("a red cat")


def test_guidance_one_is_the_conditional_loop(components) -> None:
    pipe = _pipe(components)
    out = _sample(pipe, seed=3)
    # The loop written out by hand, DDPM drawing its step noise from the same generator.
    unet, vae, scheduler = components["unet"], components["vae"], pipe.scheduler
    tokens, mask, pooled = pipe.encode_prompts(PROMPTS)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 4, 8, generator=g) * scheduler.init_noise_sigma
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask, class_labels=pooled).sample
            x = scheduler.step(eps, t, x, generator=g).prev_sample
        manual = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    assert out.shape == (2, 3, 32, 64)
    assert torch.allclose(out, manual, atol=1e-6, rtol=0)


def test_guidance_is_one_batched_call_of_both_branches(components) -> None:
    pipe = _pipe(components, DDIMScheduler)
    scale = 4.0
    out = _sample(pipe, seed=5, guidance_scale=scale, output_type="latent")
    # Unpadded, separate conditional and unconditional calls: padding the shorter token set with
    # masked zeros must not change the guided result.
    unet, scheduler = components["unet"], pipe.scheduler
    cond, uncond = pipe.encode_prompts(PROMPTS), pipe.encode_prompts(["", ""])
    x = torch.randn(2, 4, 4, 8, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma
    scheduler.set_timesteps(STEPS)
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_c, e_u = (unet(x, t, encoder_hidden_states=tok, encoder_attention_mask=m, class_labels=p).sample
                        for tok, m, p in (cond, uncond))
            x = scheduler.step(e_u + scale * (e_c - e_u), t, x).prev_sample
    assert_close_to_scale(out, x)  # latents ~57 after 10 steps: relative, not absolute
    unguided = _sample(pipe, seed=5, guidance_scale=1.0, output_type="latent")
    assert (out - unguided).abs().max() > 1e-2


def test_sizes_and_output_types(components) -> None:
    pipe = _pipe(components, DDIMScheduler)
    images = _sample(pipe, height=32, width=64)
    assert images.shape == (2, 3, 32, 64) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert _sample(pipe, height=64, width=16).shape == (2, 3, 64, 16)
    assert _sample(pipe, output_type="latent").shape == (2, 4, 4, 8)
    pil = _sample(pipe, output_type="pil")
    assert [im.size for im in pil] == [(64, 32), (64, 32)]  # PIL sizes are (width, height)
    expected = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.stack([np.asarray(im) for im in pil]), expected)
    assert pipe.size_multiple == 16  # VAE 8x, tiny UNet 2x
    for height, width in [(24, 64), (32, 40), (0, 32)]:
        with pytest.raises(ValueError, match="multiples of 16"):
            _sample(pipe, height=height, width=width)
    with pytest.raises(ValueError, match="output_type"):
        _sample(pipe, output_type="np")
    with pytest.raises(ValueError, match=r"need \(2, 4, 4, 8\)"):
        _sample(pipe, latents=torch.zeros(2, 4, 8, 8))


def test_seeds_and_given_latents(components) -> None:
    pipe = _pipe(components)  # DDPM: the seed also drives every step's noise
    first, again, other = _sample(pipe, seed=1), _sample(pipe, seed=1), _sample(pipe, seed=2)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-2
    ddim = _pipe(components, DDIMScheduler)  # deterministic steps: the initial noise is everything
    noise = torch.randn(2, 4, 4, 8, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ddim(PROMPTS, height=32, width=64, num_inference_steps=STEPS, guidance_scale=1.0,
                            latents=noise, output_type="pt"), _sample(ddim, seed=7))


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler])
def test_deterministic_schedulers_run(components, scheduler_class: type) -> None:
    pipe = _pipe(components, scheduler_class)
    images = _sample(pipe, seed=4, guidance_scale=3.0)
    assert images.shape == (2, 3, 32, 64) and torch.isfinite(images).all()
    assert len(pipe.scheduler.timesteps) == STEPS
    assert torch.equal(images, _sample(pipe, seed=4, guidance_scale=3.0))  # no state leaks between calls
    assert (images - _sample(_pipe(components), seed=4, guidance_scale=3.0)).abs().max() > 1e-3  # DDPM differs


def test_export_writes_diffusers_layout(exported) -> None:
    index = json.loads((exported / "model_index.json").read_text())
    # The code diffusers does not know travels in the folder, as community pipelines' does:
    # <folder>/recap_pipeline.py and <folder>/caption_transformer/text_conditioning.py.
    assert index["_class_name"] == ["recap_pipeline", "RecapPipeline"]
    assert index["caption_transformer"] == ["text_conditioning", "CaptionTransformer"]
    pipeline_code, component_code = (REPO / "models" / "pipeline.py").read_bytes(), TEXT_CONDITIONING.read_bytes()
    assert (exported / "recap_pipeline.py").read_bytes() == pipeline_code
    assert (exported / "text_conditioning.py").read_bytes() == component_code  # recap_pipeline.py imports it
    assert (exported / "caption_transformer" / "text_conditioning.py").read_bytes() == component_code
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["text_encoder"][1] == "T5EncoderModel"
    for name in ["unet", "vae", "caption_transformer"]:
        assert (exported / name / "diffusion_pytorch_model.safetensors").is_file(), name
    assert (exported / "text_encoder" / "model.safetensors").is_file()
    assert (exported / "tokenizer" / "tokenizer.json").is_file()
    assert (exported / "scheduler" / "scheduler_config.json").is_file()


def test_each_component_reloads_bit_identical(components, exported) -> None:
    g = torch.Generator().manual_seed(11)
    tokenizer = load_tokenizer(exported / "tokenizer")
    assert tokenizer.model_max_length == 16
    assert tokenizer(PROMPTS).input_ids == components["tokenizer"](PROMPTS).input_ids
    batch = tokenizer(PROMPTS, padding="longest", return_tensors="pt")
    ids, mask = batch.input_ids, batch.attention_mask.bool()
    t5 = T5EncoderModel.from_pretrained(exported / "text_encoder", local_files_only=True)
    states = encode_captions(components["text_encoder"], ids, mask)
    assert torch.equal(encode_captions(t5, ids, mask), states)
    xf = CaptionTransformer.from_pretrained(exported / "caption_transformer").eval()
    assert _settings(xf.config) == _settings(components["caption_transformer"].config)
    with torch.no_grad():
        tokens, pooled = components["caption_transformer"](states, mask)
        for new, old in zip(xf(states, mask), (tokens, pooled)):
            assert torch.equal(new, old)
        unet = UNet2DConditionModel.from_pretrained(exported / "unet").eval()
        x, t = torch.randn(2, 4, 4, 8, generator=g), torch.tensor([10, 700])
        kwargs = dict(encoder_hidden_states=tokens, encoder_attention_mask=mask, class_labels=pooled)
        assert torch.equal(unet(x, t, **kwargs).sample, components["unet"](x, t, **kwargs).sample)
        vae = AutoencoderKL.from_pretrained(exported / "vae").eval()
        assert vae.config.scaling_factor == components["vae"].config.scaling_factor
        assert torch.equal(vae.decode(x).sample, components["vae"].decode(x).sample)
    scheduler = DDPMScheduler.from_pretrained(exported / "scheduler")
    assert _settings(scheduler.config) == _settings(components["scheduler"].config)
    assert torch.equal(scheduler.alphas_cumprod, components["scheduler"].alphas_cumprod)


def test_a_ddim_export_reloads_its_scheduler(components, tmp_path) -> None:
    ddim = DDIMScheduler.from_config(components["scheduler"].config)
    folder = export_pipeline(tmp_path / "ddim", **{**components, "scheduler": ddim})
    again = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert _settings(again.config) == _settings(ddim.config)
    for s in (again, ddim):
        s.set_timesteps(STEPS)
    assert torch.equal(again.timesteps, ddim.timesteps)
    assert type(RecapPipeline.from_pretrained(folder).scheduler) is DDIMScheduler


def test_reloaded_pipeline_gives_identical_images(components, exported) -> None:
    loaded = RecapPipeline.from_pretrained(exported)  # our classes, not the folder's copies
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is RecapPipeline and type(loaded.caption_transformer) is CaptionTransformer
    assert type(loaded.scheduler) is DDPMScheduler
    pipe = _pipe(components)
    for scale in (1.0, 5.0):
        assert torch.equal(_sample(loaded, seed=9, guidance_scale=scale), _sample(pipe, seed=9, guidance_scale=scale))


def test_export_loads_and_generates_without_recap(components, exported, tmp_path) -> None:
    result = run_without_recap(STANDALONE_SCRIPT, [str(exported), str(tmp_path), "|".join(PROMPTS)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    assert "contains custom code in recap_pipeline.py" in theirs["refused"]
    assert "Pass `trust_remote_code=True`" in theirs["refused"]
    assert theirs["classes"] == ["diffusers_modules.local.recap_pipeline.RecapPipeline",
                                 "diffusers_modules.local.text_conditioning.CaptionTransformer"]
    assert "Expected types" not in result.stderr  # diffusers' component type check passes
    ours = RecapPipeline.from_pretrained(exported)
    ours.set_progress_bar_config(disable=True)
    assert torch.equal(theirs["images"], _sample(ours, seed=9, guidance_scale=3.0))  # same code, same machine
    assert theirs["tokenizer"] == "TokenizersBackend" and theirs["max_tokens"] == 16
    assert theirs["ids"] == components["tokenizer"](PROMPTS).input_ids
    again = tmp_path / "again"
    resaved = json.loads((again / "model_index.json").read_text())
    assert resaved.pop("_name_or_path") == str(exported)  # diffusers notes where a loaded pipeline came from
    assert resaved == json.loads((exported / "model_index.json").read_text())
    for name in ("recap_pipeline.py", "text_conditioning.py", "caption_transformer/text_conditioning.py"):
        assert (again / name).read_bytes() == (exported / name).read_bytes(), name


def test_an_export_from_before_the_code_travelled_still_loads(components, exported, tmp_path) -> None:
    """Exports written without the code files name ``models.text_conditioning`` and the class by
    name: recap still loads them, and saving again writes the self-contained form."""
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    for name in ("recap_pipeline.py", "text_conditioning.py", "caption_transformer/text_conditioning.py"):
        (old / name).unlink()
    index = json.loads((old / "model_index.json").read_text())
    index.update(_class_name="RecapPipeline", caption_transformer=["models.text_conditioning", "CaptionTransformer"])
    (old / "model_index.json").write_text(json.dumps(index))
    loaded = RecapPipeline.from_pretrained(old)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.caption_transformer) is CaptionTransformer
    assert torch.equal(_sample(loaded, seed=3), _sample(_pipe(components), seed=3))
    loaded.save_pretrained(tmp_path / "new")  # re-saved: self-contained (docs/train_t2i.md)
    resaved = json.loads((tmp_path / "new" / "model_index.json").read_text())
    assert resaved["_class_name"] == ["recap_pipeline", "RecapPipeline"]
    assert (tmp_path / "new" / "recap_pipeline.py").read_bytes() == (exported / "recap_pipeline.py").read_bytes()


def test_save_pretrained_refuses_push_to_hub(components, tmp_path) -> None:
    with pytest.raises(ValueError, match="without push_to_hub, then upload the folder"):
        _pipe(components).save_pretrained(tmp_path / "pushed", push_to_hub=True)
    assert not (tmp_path / "pushed").exists()
