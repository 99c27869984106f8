"""Pieces of train-t2i tested in process: EMA update math, gradient checkpointing, the staged LR
schedule, the toy T5 being the same in every stage that builds it, seeds kept on the CPU, and
the run settings every training stage hands to its session."""

from __future__ import annotations

from pathlib import Path

import torch

from train.training.checkpointing import TrainState
from train.config.training import OptimizerConfig
from train.training.optimization import staged_lr_factor
from train.training.ema import EmaWeights
from tests.helpers import assert_close_to_scale


def test_ema_follows_diffusers_decay_schedule_in_a_module_copy() -> None:
    model = torch.nn.Linear(3, 2)
    ema = EmaWeights(model, decay=0.5, device=torch.device("cpu"))
    state = TrainState()
    shadow = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step))
        ema.step(model.parameters(), state)
        # diffusers: decay = min(0.5, (1 + s) / (10 + s)) with s = step - 1, and 0 at the first step
        s = step - 1
        decay = 0.0 if s == 0 else min(0.5, (1 + s) / (10 + s))
        shadow = [decay * old + (1 - decay) * p.detach() for old, p in zip(shadow, model.parameters())]
        for expected, got in zip(shadow, ema.module.parameters()):
            assert_close_to_scale(got, expected)
    assert state.extra["ema_steps"] == 5
    assert all(not p.requires_grad for p in ema.module.parameters())
    again = EmaWeights(model, decay=0.5, device=torch.device("cpu"))
    again.restored(state)  # a resumed run continues the decay schedule where it was
    assert again.ema.optimization_step == 5


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    from train.config.loading import load_experiment
    from train.t2i.parts import build_denoiser

    unet = load_experiment([]).unet
    torch.manual_seed(0)
    plain = build_denoiser(unet, text_dim=16, latent_channels=4)
    checkpointed = build_denoiser(unet, text_dim=16, latent_channels=4)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.unet.enable_gradient_checkpointing()
    checkpointed.train()
    plain.train()
    g = torch.Generator().manual_seed(1)
    noisy, states = torch.randn(2, 4, 8, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    t = torch.tensor([10, 900])
    for model in (plain, checkpointed):
        model(noisy, t, states * mask[..., None], mask).square().mean().backward()
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_each_resolution_stage_warms_up_to_its_own_lr() -> None:
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=2, schedule="constant")
    starts, lengths, lrs = (0, 4), (4, 3), (1e-3, 2e-4)
    factors = [staged_lr_factor(step, cfg, starts, lengths, lrs) for step in range(7)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 0.1, 0.2, 0.2]


def test_the_toy_t5_is_the_same_wherever_it_is_built(tmp_path) -> None:
    from data_pipeline.caption_tokenizer import save_tokenizer
    from tests.helpers import toy_tokenizer
    from train.config.loading import load_experiment
    from train.t2i.parts import load_text_encoder

    save_tokenizer(toy_tokenizer(16), tmp_path / "tok")
    te = load_experiment([f"text_encoder.tokenizer={tmp_path / 'tok'}"]).text_encoder
    torch.manual_seed(123)  # the global RNG does not matter, and is left as it was
    before = torch.random.get_rng_state()
    _, a = load_text_encoder(te, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    _, b = load_text_encoder(te, seed=0)
    _, c = load_text_encoder(te, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_bf16_autocast_trains_like_fp32(tmp_path) -> None:
    """runtime.precision=bf16 (the GPU default) also runs on the CPU: the same steps as fp32, with the
    loss within bf16's rounding."""
    from data_pipeline.caption_tokenizer import save_tokenizer
    from data_pipeline.options import ToyDataOptions
    from data_pipeline.toy_shards import write_ground_truth_captions, write_toy_dataset
    from models.vae import build_vae
    from tests.helpers import logged_losses, run_stage, toy_tokenizer

    options = ToyDataOptions(train_shards=1, heldout_shards=1, samples_per_shard=8, seed=2, processes=1,
                             world="full", text_probability=0.4)
    write_toy_dataset({"train": tmp_path / "train", "heldout": tmp_path / "heldout"}, options, progress=False)
    shards = write_ground_truth_captions(tmp_path / "train", tmp_path / "captioned")
    save_tokenizer(toy_tokenizer(16), tmp_path / "tok")
    torch.manual_seed(0)
    build_vae([8, 16, 16, 16], layers_per_block=1, norm_num_groups=8).save_pretrained(tmp_path / "vae")
    common = ["train_t2i.cache=null", f"train_t2i.input={shards}", f"train_t2i.vae={tmp_path / 'vae'}", f"text_encoder.tokenizer={tmp_path / 'tok'}",
              "text_encoder.max_tokens=16", "train_t2i.stages=[{resolution: 64, steps: 3, global_batch_size: 4, "
              "micro_batch_size: 4}]", "train_t2i.sampling.every_steps=null", "logger.wandb.mode=disabled",
              "logger.progress=false", "data.reader.num_workers=0", "data.reader.open_shards=1"]
    losses = {}
    for precision in ("fp32", "bf16"):
        summary = run_stage("train_t2i", [f"run.root={tmp_path / precision}", f"runtime.precision={precision}", *common])
        assert summary["steps"] == 3
        losses[precision] = [v[-1] for _, v in sorted(logged_losses(tmp_path / precision / "toy" / "train_t2i").items())]
    assert losses["bf16"] != losses["fp32"]  # autocast did run in bf16
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) < 0.05 * a


def test_per_sample_seeds_stay_on_the_cpu() -> None:
    from train.training.loop import to_device

    batch = {"pixels": torch.zeros(2, 3, 8, 8, dtype=torch.uint8), "seeds": torch.tensor([5, 7]), "used": ["dsc", "txt"]}
    moved = to_device(batch, torch.device("meta"))  # any device but the CPU
    assert moved["pixels"].device.type == "meta"
    assert moved["seeds"] is batch["seeds"] and moved["used"] == ["dsc", "txt"]


def test_run_settings_give_the_schedule_and_the_fingerprint() -> None:
    from train.config.execution import CheckpointConfig, LoggerConfig, ResumeConfig
    from train.training.session import READER_TUNING_KEYS, RunSettings

    snapshot = {"seed": 3, "data": {"train": "x", "reader": {"num_workers": 2, "strict": False}},
                "logger": {"progress": False}}
    settings = RunSettings(Path("run"), "train_vae", "toy", CheckpointConfig(every_steps=7), ResumeConfig(),
                           LoggerConfig(progress=False, log_every_steps=3), snapshot, ("seed", "data.reader"),
                           READER_TUNING_KEYS, nan_policy="skip", max_consecutive_skips=5)
    assert settings.fingerprint == {"seed": 3, "data.reader.num_workers": 2}  # strict: reader tuning
    schedule = settings.schedule(100, 2, 16)
    assert (schedule.steps, schedule.accum, schedule.global_batch) == (100, 2, 16)
    assert (schedule.checkpoint_every, schedule.log_every, schedule.show_progress) == (7, 3, False)
    assert (schedule.nan_policy, schedule.max_consecutive_skips) == ("skip", 5)
