"""The schema of a composed experiment config (conf/recap.yaml + groups + experiment).

Every key in conf/ has a field here and every field is read by a stage or a model builder;
`typed_config.build` rejects unknown keys, wrong types and inconsistent values with the key's
full path and the fix. Below the entry points, code takes these dataclasses, never the config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.options import ReaderOptions, ToyDataOptions
from models.decoding_options import DecodingOptions
from train.config_evaluation import EvaluateConfig, TrainEvalClipConfig
from train.config_sampling import PipelineConfig, SampleConfig, SweepReportConfig
from train.config_t2i import CacheConfig, CaptionMixConfig, TrainT2IConfig
from train.config_training import OptimizerConfig, TrainingStageConfig, check_batch
from train.typed_config import ConfigError

__all__ = ["ExperimentConfig", "OptimizerConfig", "TrainingStageConfig", "check_batch"]


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives: stage outputs go to ``<root>/<name>/<stage>``."""

    name: str
    root: str = "runs"

    @property
    def dir(self) -> Path:
        return Path(self.root) / self.name


@dataclass(frozen=True)
class DataConfig:
    """Shards: a directory of .tar files, a brace pattern, a `pipe:` command or a URL."""

    train: str
    heldout: str
    reader: ReaderOptions = field(default_factory=ReaderOptions)
    toy: ToyDataOptions | None = None  # set when the data is the generated synthetic scenes


@dataclass(frozen=True)
class RuntimeConfig:
    """Process and precision setup (train/runtime.py).

    kind: single (one process), ddp (torchrun; gloo on CPU, NCCL on GPU) or deepspeed (ZeRO
    stage ``zero_stage`` through accelerate). precision ``auto`` is bf16 on GPU, fp32 on CPU.
    """

    kind: Literal["single", "ddp", "deepspeed"] = "single"
    zero_stage: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    offload_optimizer: bool = False
    timeout_s: int = 600

    def validate(self) -> None:
        if self.kind == "deepspeed" and self.zero_stage not in (1, 2, 3):
            raise ConfigError("zero_stage", f"deepspeed needs zero_stage 1, 2 or 3, got {self.zero_stage}")
        if self.kind != "deepspeed" and self.zero_stage != 0:
            raise ConfigError("zero_stage", f"only runtime.kind=deepspeed uses ZeRO; set runtime=zero{self.zero_stage}")
        if self.offload_optimizer and self.kind != "deepspeed":
            raise ConfigError("offload_optimizer", "needs runtime.kind=deepspeed")
        if self.timeout_s < 1:
            raise ConfigError("timeout_s", f"must be >= 1, got {self.timeout_s}")


@dataclass(frozen=True)
class WandbConfig:
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "recap-diffusion"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LoggerConfig:
    """Progress bars and metrics: JSONL always, wandb offline by default."""

    progress: bool = True
    log_every_steps: int = 1
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        if self.log_every_steps < 1:
            raise ConfigError("log_every_steps", f"must be >= 1, got {self.log_every_steps}")


@dataclass(frozen=True)
class SlurmConfig:
    """The batch job `recap launch STAGE launcher=slurm` submits (launch/slurm.py renders it; docs/slurm.md)."""

    time: str | int = "24:00:00"  # wall-clock limit: M, M:S, H:M:S, D-H, D-H:M or D-H:M:S (a number: minutes)
    partition: str | None = None  # null: the cluster's default partition
    account: str | None = None  # null: your default account
    qos: str | None = None  # null: the partition's default QOS
    gpus_per_node: int | None = None  # null: one per process (launcher.nproc_per_node); 0 requests none (CPU nodes)
    cpus_per_task: int = 8  # CPUs of each node's task (all its processes and their DataLoader workers)
    signal_lead_s: int = 90  # SIGUSR1 this many seconds before the time limit: checkpoint, exit 75, requeue
    rdzv_port: int | None = None  # rendezvous port on the job's first node; null: 20000 + job id % 20000
    python: str | None = None  # interpreter on the nodes; null: the one running `recap launch`
    setup: list[str] = field(default_factory=list)  # shell lines run before the stage: module load ..., source ...
    env: dict[str, str] = field(default_factory=dict)  # variables exported to every process (NCCL_DEBUG: WARN)
    sbatch_args: list[str] = field(default_factory=list)  # more sbatch options, one #SBATCH line each (--exclusive)
    job_name: str | None = None  # null: recap-<stage>-<run.name>

    def validate(self) -> None:
        from launch.slurm import time_limit_seconds  # pure; launch/ never imports the config

        from train.redaction import is_secret_key

        try:
            limit_s = time_limit_seconds(str(self.time))
        except ValueError as exc:
            raise ConfigError("time", str(exc)) from None
        if not 0 < self.signal_lead_s < limit_s:
            raise ConfigError("signal_lead_s", f"must be > 0 and below the time limit ({limit_s} s), got "
                              f"{self.signal_lead_s}")
        if self.cpus_per_task < 1 or (self.gpus_per_node is not None and self.gpus_per_node < 0):
            raise ConfigError("cpus_per_task", "cpus_per_task must be >= 1 and gpus_per_node >= 0 (or null)")
        if self.rdzv_port is not None and not 1024 <= self.rdzv_port <= 65535:
            raise ConfigError("rdzv_port", f"must be in [1024, 65535] or null, got {self.rdzv_port}")
        for name in self.env:
            if not name.isidentifier() or not name.isascii():
                raise ConfigError(f"env.{name}", "is not a shell variable name (letters, digits, _)")
            if is_secret_key(name):
                raise ConfigError(f"env.{name}", "looks like a credential, which the sbatch script would store in "
                                  f"plain text; export {name} before `recap launch` instead (sbatch passes it on)")
        for arg in self.sbatch_args:
            if not arg.startswith("-"):
                raise ConfigError("sbatch_args", f"'{arg}' is not an sbatch option; write them as --name=value")
        if self.job_name is not None and (not self.job_name or any(c.isspace() for c in self.job_name)):
            raise ConfigError("job_name", f"must be non-empty without spaces, got {self.job_name!r}")


@dataclass(frozen=True)
class LauncherConfig:
    """How `recap STAGE` starts its processes: here (local), under torchrun, under DeepSpeed's launcher
    (deepspeed), or as a Slurm batch job (slurm, through `recap launch`); see docs/slurm.md."""

    kind: Literal["local", "torchrun", "deepspeed", "slurm"] = "local"
    nproc_per_node: int = 1  # processes per node: one per GPU
    nnodes: int = 1
    node_rank: int = 0  # this node's index (torchrun; Slurm and DeepSpeed number the nodes themselves)
    rdzv_endpoint: str | None = "127.0.0.1:29500"  # node 0's host:port; deepspeed: null asks the hostfile's first host
    rdzv_timeout_s: int = 300  # how long torchrun's nodes wait for each other
    rdzv_id: str = "recap"  # rendezvous id shared by the nodes of one job (under Slurm: slurm-<job id>)
    shutdown_timeout_s: int = 120  # torchrun: after passing SIGTERM/SIGUSR1 on, wait this long for the preemption checkpoint
    hostfile: str | None = None  # launcher=deepspeed: one '<host> slots=<N>' line per node
    slurm: SlurmConfig | None = None  # launcher=slurm: the batch job

    def validate(self) -> None:
        if self.nproc_per_node < 1 or self.nnodes < 1:
            raise ConfigError("nproc_per_node", "nproc_per_node and nnodes must be >= 1")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError("node_rank", f"must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        if self.kind == "local" and self.nproc_per_node * self.nnodes != 1:
            raise ConfigError("kind", "launcher=local runs one process; use launcher=torchrun for more")
        if self.shutdown_timeout_s < 1:
            raise ConfigError("shutdown_timeout_s", f"must be >= 1 second, got {self.shutdown_timeout_s}")
        if self.kind == "torchrun" and self.rdzv_endpoint is None:
            raise ConfigError("rdzv_endpoint", "torchrun's nodes meet at node 0: set it to <node 0 host>:<port>")
        if (self.kind == "deepspeed") != (self.hostfile is not None):
            raise ConfigError("hostfile", "launcher=deepspeed needs launcher.hostfile=PATH (lines '<host> slots=<N>')"
                              if self.kind == "deepspeed" else "only launcher=deepspeed reads a hostfile")
        if (self.kind == "slurm") != (self.slurm is not None):
            raise ConfigError("kind", "choose Slurm with the group, launcher=slurm, which brings its slurm section")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 2

    def validate(self) -> None:
        if self.every_steps < 1 or self.keep_last < 1:
            raise ConfigError("every_steps", "every_steps and keep_last must be >= 1")


@dataclass(frozen=True)
class ResumeConfig:
    """allow_config_change: resume although resume-relevant config changed.
    fallback_to_previous: a corrupt newest checkpoint falls back to the one before it."""

    allow_config_change: bool = False
    fallback_to_previous: bool = False


@dataclass(frozen=True)
class CaptionerConfig:
    """An open_clip CoCa. ``architecture`` is an open_clip model config (embed_dim, vision_cfg,
    text_cfg, multimodal_cfg) used instead of open_clip's built-in ``model_name`` config."""

    model_name: str
    architecture: dict[str, Any] | None = None
    pretrained: str | None = None  # local open_clip checkpoint file; null = random init


@dataclass(frozen=True)
class T5Architecture:
    """A T5 encoder built from scratch (toy runs): transformers.T5Config fields."""

    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int


@dataclass(frozen=True)
class TextEncoderConfig:
    """Frozen T5 encoder: ``pretrained`` HF folder (production) or a tiny ``architecture``."""

    max_tokens: int
    pretrained: str | None = None
    architecture: T5Architecture | None = None
    tokenizer: str | None = None  # HF tokenizer folder; null = the pretrained folder

    def validate(self) -> None:
        if (self.pretrained is None) == (self.architecture is None):
            raise ConfigError("pretrained", "set exactly one of text_encoder.pretrained or text_encoder.architecture")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens", f"must be >= 1, got {self.max_tokens}")


@dataclass(frozen=True)
class VaeConfig:
    """diffusers AutoencoderKL with 8x downsampling: a ``pretrained`` local folder or an
    architecture trained by `recap train-vae` (toy)."""

    pretrained: str | None = None
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64, 64])
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 16
    scaling_factor: float | None = None  # null: the pretrained folder's, or estimated by train-vae

    def validate(self) -> None:
        if len(self.block_out_channels) != 4:
            raise ConfigError("block_out_channels", "needs 4 levels (3 downsamples = 8x), got "
                              f"{len(self.block_out_channels)}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ConfigError("norm_num_groups", f"must divide every block_out_channels {self.block_out_channels}")


@dataclass(frozen=True)
class UnetConfig:
    """diffusers UNet2DConditionModel with scale-shift timestep norm (see models/unet.py)."""

    block_out_channels: list[int]
    attention_levels: list[bool]
    layers_per_block: int
    attention_head_dim: int
    xf_layers: int
    xf_width: int
    xf_heads: int

    def validate(self) -> None:
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ConfigError("attention_levels", "needs one entry per block_out_channels level")
        if self.xf_width % self.xf_heads:
            raise ConfigError("xf_heads", f"must divide xf_width={self.xf_width}")


@dataclass(frozen=True)
class DiffusionConfig:
    """Noise schedule and objective (diffusers scheduler names)."""

    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    num_train_timesteps: int = 1000
    min_snr_gamma: float | None = None
    cfg_dropout: float = 0.1

    def validate(self) -> None:
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ConfigError("cfg_dropout", f"must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True, kw_only=True)
class TrainVaeConfig(TrainingStageConfig):
    """`recap train-vae`: reconstruction + KL on random crops of the training images."""

    resolution: int
    kl_weight: float = 1e-6

    def validate(self) -> None:
        super().validate()
        if self.resolution % 8:
            raise ConfigError("resolution", f"must be a multiple of 8 (the VAE downsamples 8x), got {self.resolution}")


@dataclass(frozen=True, kw_only=True)
class PretrainCaptionerConfig(TrainingStageConfig):
    """`recap pretrain-captioner`: CoCaLoss (contrastive + captioning) on images and alt-text."""

    caption_key: str = "txt"  # the text member trained on (the alt-text)
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        super().validate()
        if self.contrastive_weight < 0 or self.caption_weight <= 0:
            raise ConfigError("caption_weight", "caption_weight must be > 0 and contrastive_weight >= 0")


@dataclass(frozen=True, kw_only=True)
class FinetuneCaptionerConfig(TrainingStageConfig):
    """`recap finetune-captioner style=ssc|dsc`: captioning loss only, on curated ground truth."""

    style: Literal["ssc", "dsc"]
    init_from: str  # an exported captioner directory, or an open_clip checkpoint of captioner.model_name
    freeze_image_tower: bool = True
    caption_weight: float = 1.0
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        super().validate()
        if self.caption_weight <= 0:
            raise ConfigError("caption_weight", f"must be > 0, got {self.caption_weight}")


@dataclass(frozen=True)
class CaptionConfig:
    """`recap caption`: caption a folder of images, an image file, or shards."""

    captioner: str  # an exported captioner directory (finetune-captioner's <style>/captioner)
    input: str | None = None  # required on the command line: caption.input=<folder|image|shards>
    output: str | None = None  # a JSONL file; null prints "<key>\t<caption>" lines
    batch_size: int = 16
    limit: int | None = None  # caption at most this many images
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit", f"must be >= 1 or null, got {self.limit}")


@dataclass(frozen=True)
class EvaluateCaptionerConfig:
    """`recap evaluate-captioner`: attribute precision/recall of alt-text and captioners on
    held-out toy samples (data.heldout), against their ground truth."""

    captioners: dict[str, str]  # name -> exported captioner directory
    samples: int | None = 256  # held-out samples scored (null: all)
    batch_size: int = 32
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.samples is not None and self.samples < 1:
            raise ConfigError("samples", f"must be >= 1 or null, got {self.samples}")


@dataclass(frozen=True)
class RecaptionConfig:
    """`recap recaption`: write each caption key's captioner output into every input shard."""

    input: str  # shards: a directory of .tar files, a brace pattern, pipe: commands
    output: str  # a directory; one shard per input shard, same name
    captioners: dict[str, str]  # caption key -> exported captioner directory
    keys: list[str] = field(default_factory=lambda: ["ssc", "dsc"])  # which captioners run, in order
    batch_size: int = 32
    num_workers: int = 2  # DataLoader workers decoding and preprocessing images
    only_failures: bool = False  # redo only the keys listed as failures of done shards
    rank: int | None = None  # null: from torchrun (RANK) or a Slurm array (SLURM_ARRAY_TASK_ID)
    world_size: int | None = None
    decoding: DecodingOptions = field(default_factory=DecodingOptions)

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {self.num_workers}")
        if not self.keys:
            raise ConfigError("keys", "must name at least one caption key")


@dataclass(frozen=True)
class TrainTokenizerConfig:
    """`recap train-tokenizer`: fit the toy T5 tokenizer (saved at text_encoder.tokenizer)."""

    input: str  # shards whose captions it learns from (recaption's output)
    keys: list[str] = field(default_factory=lambda: ["txt", "ssc", "dsc"])  # caption keys read
    vocab_size: int = 1000
    samples: int | None = None  # read at most this many samples (null: all)

    def validate(self) -> None:
        if not self.keys:
            raise ConfigError("keys", "must name at least one caption key")
        if self.samples is not None and self.samples < 1:
            raise ConfigError("samples", f"must be >= 1 or null, got {self.samples}")


@dataclass(frozen=True)
class ExperimentConfig:
    """The whole composed config; each stage reads the sections it needs."""

    run: RunConfig
    seed: int
    data: DataConfig
    captioner: CaptionerConfig
    text_encoder: TextEncoderConfig
    vae: VaeConfig
    unet: UnetConfig
    diffusion: DiffusionConfig
    runtime: RuntimeConfig
    logger: LoggerConfig
    launcher: LauncherConfig
    checkpoint: CheckpointConfig
    resume: ResumeConfig
    train_vae: TrainVaeConfig
    pretrain_captioner: PretrainCaptionerConfig
    finetune_captioner: FinetuneCaptionerConfig
    caption: CaptionConfig
    evaluate_captioner: EvaluateCaptionerConfig
    recaption: RecaptionConfig
    train_tokenizer: TrainTokenizerConfig
    caption_mix: CaptionMixConfig
    cache: CacheConfig
    train_t2i: TrainT2IConfig
    sample: SampleConfig
    pipeline: PipelineConfig
    sweep_report: SweepReportConfig
    train_eval_clip: TrainEvalClipConfig
    evaluate: EvaluateConfig

    def validate(self) -> None:
        # Caught here, before `recap` starts torchrun, rather than in every worker (train/runtime.py).
        world = self.launcher.nproc_per_node * self.launcher.nnodes
        if self.runtime.kind == "single" and world > 1:
            raise ConfigError(
                "runtime",
                f"runtime=single runs one process but the launcher starts {world} (launcher.nproc_per_node x "
                "launcher.nnodes); use runtime=ddp or zero1/2/3, or launcher=local",
            )
