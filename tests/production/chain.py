"""The production chain on CPU: every stage a `experiment=dalle3_256` user runs, through the CLI.

    python -m tests.production.chain --root /tmp/prodchain [--full-size-coca]

writes the substitutes of tests/production/substitutes.py under ROOT (the four pretrained weight
sets, and img2dataset-layout shards), then runs, each as `python -m train.cli STAGE
experiment=dalle3_256 ...` in a fresh process exactly as `recap STAGE` would:

    pretrain-captioner -> finetune-captioner style=ssc -> style=dsc -> recaption (the training
    shards, then the held-out shards evaluate takes its DSC references from) -> cache -> train-t2i
    -> sample -> evaluate

The preset's groups stay as they are (text_encoder=t5_xxl, vae=sd, unet=dalle3_0p9b,
runtime=zero2, launcher=torchrun, data=img2dataset) but for captioner=coca_vit_b32, the
preset's smaller CoCa, whose model_name names the small registered variant unless
--full-size-coca; the other overrides are paths, sizes and steps (`overrides` and `STAGES` list
every one). The multi-process stages run under torchrun with 2 processes on gloo, ZeRO-2 for the
trained ones; sample and evaluate run in one process. HF_HUB_OFFLINE=1: any hub access fails at once.

docs/real-run.md says how long it takes; tests/production/test_production_chain.py runs it and
checks what each stage wrote.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.production.substitutes import Substitutes, write_substitutes

REPO = Path(__file__).resolve().parents[2]
STARTUP = Path(__file__).resolve().parent / "startup"  # its sitecustomize registers the small CoCa
EXPERIMENT = "dalle3_256"
RESOLUTION = 64  # train, sample and evaluate size (the preset: 256)


def overrides(root: Path, s: Substitutes) -> list[str]:
    """What every stage gets: the preset, the substitutes' paths, and sizes for 2 CPU processes."""
    return [
        f"experiment={EXPERIMENT}", f"run.root={root / 'runs'}",
        # paths: where the substitutes are (the preset's /models/... and /data/img2dataset/...)
        f"data.train={s.train}", f"data.heldout={s.heldout}",
        f"text_encoder.pretrained={s.t5}", f"vae.pretrained={s.vae}",
        "captioner=coca_vit_b32", f"captioner.model_name={s.coca_name}", f"captioner.pretrained={s.coca}",
        f"evaluate.clip.pretrained={s.clip}",
        # sizes: 2 processes (the preset: 8), one reader worker each, a tiny UNet and xf (the preset's is 1.2 B)
        "launcher.nproc_per_node=2", "data.reader.num_workers=1", "data.reader.prefetch_factor=1",
        "unet.block_out_channels=[32,32,32]", "unet.layers_per_block=1", "unet.attention_head_dim=16",
        "unet.xf_width=32", "unet.xf_heads=2", "unet.xf_layers=1", "text_encoder.max_tokens=32",
        # train-t2i's schedule; cache reads its resolutions too
        f"train_t2i.stages=[{{resolution: {RESOLUTION}, steps: 2, global_batch_size: 4, micro_batch_size: 2, "
        "lr: 1.0e-4}]",
        "logger.wandb.mode=disabled", "logger.progress=false",
    ]


DECODING = ["decoding.max_length=8", "decoding.min_length=2"]
# (stage and its own overrides): steps, batch sizes, output paths
STAGES: list[tuple[str, list[str]]] = [
    ("pretrain-captioner", ["pretrain_captioner.steps=1", "pretrain_captioner.global_batch_size=4",
                            "pretrain_captioner.micro_batch_size=2"]),
    *[("finetune-captioner", [f"style={style}", "finetune_captioner.steps=1", "finetune_captioner.global_batch_size=4",
                              "finetune_captioner.micro_batch_size=2"]) for style in ("ssc", "dsc")],
    ("recaption", ["recaption.batch_size=4", "recaption.num_workers=1", *(f"recaption.{d}" for d in DECODING)]),
    # the held-out shards, for evaluate's DSC references (docs/evaluation.md), in a run directory of their own
    ("recaption", ["recaption.input=${data.heldout}", "recaption.output=${run.root}/${run.name}/recaption/heldout",
                   "hydra.run.dir=${run.root}/${run.name}/recaption_heldout",
                   "recaption.batch_size=4", "recaption.num_workers=1", *(f"recaption.{d}" for d in DECODING)]),
    ("cache", ["cache.batch_size=4", "cache.num_workers=1"]),
    ("train-t2i", ["train_t2i.cache=${cache.output}", "train_t2i.sampling.steps=2"]),
    ("sample", [f"sample.height={RESOLUTION}", f"sample.width={RESOLUTION}", "sample.sampler.steps=2",
                "sample.prompts=['a red fox in snow','a blue mug']"]),
    ("evaluate", ["evaluate.input=${run.root}/${run.name}/recaption/heldout", "evaluate.samples=4",
                  f"evaluate.size={RESOLUTION}", "evaluate.sampler.steps=2", "evaluate.sampler.batch_size=4"]),
]


@dataclass
class StageRun:
    """One `recap STAGE` process: its arguments, exit code, times and stderr."""

    stage: str
    args: list[str]
    returncode: int
    seconds: float  # wall
    cpu_seconds: float  # every process of the stage, user + system
    stderr: str


def free_port() -> int:
    """A TCP port nothing listens on now: each stage's torchrun rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stage_env(s: Substitutes) -> dict[str, str]:
    """The stage processes' environment: offline, one thread, the small CoCa registered with open_clip."""
    path = os.pathsep.join(p for p in (str(STARTUP), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": path, "RECAP_OPEN_CLIP_CONFIGS": str(s.open_clip_configs)}


def run_stage(stage: str, args: list[str], env: dict[str, str]) -> StageRun:
    """`recap STAGE ARGS` in a fresh interpreter from the repository root."""
    argv = [*args, f"launcher.rdzv_endpoint=127.0.0.1:{free_port()}"]
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run([sys.executable, "-m", "train.cli", stage, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    return StageRun(stage, argv, done.returncode, round(time.perf_counter() - start, 1),
                    round(_children_cpu() - cpu, 1), done.stderr)


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children and theirs: a stage's cost
    whatever else the machine runs."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_chain(root: Path, *, full_size_coca: bool = False) -> tuple[Substitutes, list[StageRun]]:
    """Write the substitutes under ``root`` and run every stage until one fails; returns them and
    each stage's run."""
    substitutes = write_substitutes(root, full_size_coca=full_size_coca)
    common, env = overrides(root, substitutes), stage_env(substitutes)
    runs = []
    for stage, own in STAGES:
        runs.append(run_stage(stage, [*common, *own], env))
        print(f"{stage} {' '.join(own)}: exit {runs[-1].returncode} in {runs[-1].seconds} s "
              f"({runs[-1].cpu_seconds} CPU s)", flush=True)
        if runs[-1].returncode:
            print(runs[-1].stderr[-4000:], file=sys.stderr)
            break
    return substitutes, runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="an empty folder for the substitutes and the runs")
    parser.add_argument("--full-size-coca", action="store_true", help="open_clip's coca_ViT-B-32 (253 M parameters) "
                        "instead of the small registered variant")
    args = parser.parse_args()
    start = time.perf_counter()
    _, runs = run_chain(args.root.resolve(), full_size_coca=args.full_size_coca)
    failed = [r for r in runs if r.returncode]
    print(f"{len(runs) - len(failed)} of {len(STAGES)} stages done in {time.perf_counter() - start:.0f} s")
    return 1 if failed or len(runs) < len(STAGES) else 0


if __name__ == "__main__":
    sys.exit(main())
