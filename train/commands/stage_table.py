"""The `recap` stages: name -> module, summary, what is checked before a launch.

The table is the CLI's dispatch, nothing more: each module under train/stages/ has
`run(cfg, run_dir)`; it is imported lazily so that `recap --help` stays fast. What a `precheck`
stage checks before a launch is in train/commands/prechecks.py (no model library imported).
`ls train/stages` reads like `recap --help`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str  # imported lazily: `recap --help` stays fast
    summary: str
    batch_section: str | None = None  # config section with global/micro batch sizes, checked before launch
    precheck: bool = False  # train/commands/prechecks.py validates its arguments before launch (exit 2)
    wandb: bool = False  # logs to wandb (logger.wandb): mode=online is checked before the stage runs
    shard_job: bool = False  # each process locks its slot of the run and output directories (run_lock.py)
    # Splits its work over the processes a launcher starts (ranks). The others run in one process
    # whatever the launcher: under torchrun each of N copies would redo the whole stage.
    multi_process: bool = False


STAGES: dict[str, Stage] = {
    "make-toy-data": Stage("train.stages.make_toy_data", "Generate the synthetic-scenes shards (img2dataset layout) with ground truth.",
                           wandb=True),
    "pretrain-captioner": Stage("train.stages.pretrain_captioner", "Pretrain a CoCa captioner on images + alt-text "
                                "(contrastive + captioning loss).", batch_section="pretrain_captioner", wandb=True,
                                multi_process=True),
    "finetune-captioner": Stage("train.stages.finetune_captioner", "Fine-tune it into the short (style=ssc) or descriptive "
                                "(style=dsc) captioner on curated ground truth.", batch_section="finetune_captioner",
                                wandb=True, multi_process=True),
    "caption": Stage("train.stages.caption", "Caption a folder of images, an image or shards with an exported captioner "
                     "(caption.input=PATH)."),
    "evaluate-captioner": Stage("train.stages.evaluate_captioner", "Score alt-text, SSC and DSC captions on held-out toy "
                                "samples: attribute precision/recall."),
    "recaption": Stage("train.stages.recaption", "Write SSC and DSC captions into every training shard (distributed, "
                       "resumable, exactly-once).", precheck=True, shard_job=True, multi_process=True),
    "train-tokenizer": Stage("train.stages.train_tokenizer", "Fit the toy T5 tokenizer on the recaptioned captions "
                             "(saved in Hugging Face format)."),
    "train-vae": Stage("train.stages.train_vae", "Train the toy AutoencoderKL on training images; export a diffusers folder.",
                       batch_section="train_vae", wandb=True, multi_process=True),
    "cache": Stage("train.stages.cache", "Precompute VAE latents (per resolution stage) and T5 states (per caption key) "
                   "into cache shards for train-t2i (distributed, resumable).", precheck=True, shard_job=True,
                   multi_process=True),
    "train-t2i": Stage("train.stages.train_t2i", "Train the T5-conditioned latent diffusion UNet on the recaptioned shards "
                       "(caption mix, buckets, progressive resolution, EMA); export a diffusers pipeline.", precheck=True,
                       wandb=True, multi_process=True),
    "sample": Stage("train.stages.sample", "Generate images from prompts with the trained pipeline (CFG, DDIM or "
                    "DPM-Solver++, any bucket size, EMA or raw weights, optional prompt rewriter)."),
    "train-eval-clip": Stage("train.stages.train_eval_clip", "Toy: train the evaluation CLIP and the attribute probe on "
                             "held-out ground truth (reports their accuracy on real images).",
                             batch_section="train_eval_clip", wandb=True),
    "evaluate": Stage("train.stages.evaluate", "CLIP score (vs alt-text and DSC references) and attribute-binding accuracy "
                      "of generated images; JSON + markdown table."),
    "sweep-report": Stage("train.stages.sweep_report", "Table and plot of the evaluation metrics over the points of a "
                          "sweep (e.g. the caption-mix sweep)."),
    "pipeline": Stage("train.stages.pipeline", "Run every stage in order (complete ones are skipped) and write "
                      "runs/<experiment>/report.md; with -m, one train-t2i..evaluate per sweep point."),
}


def hydra_job_name(stage: str) -> str:
    return stage.replace("-", "_")  # Hydra's job name: names run directories (conf/recap.yaml)
