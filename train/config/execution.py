"""How a stage runs: processes and precision, the launcher (and its Slurm job), logging,
checkpoints and resume."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from train.config.typed import ConfigError


@dataclass(frozen=True)
class RuntimeConfig:
    """Process and precision setup (train/runtime/processes.py).

    kind: single (one process), ddp (torchrun; gloo on CPU, NCCL on GPU) or deepspeed (ZeRO
    stage ``zero_stage`` through accelerate). precision ``auto`` is bf16 on GPU, fp32 on CPU.
    ``allow_tf32``: fp32 matmuls on a GPU run on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32;
    cuDNN convolutions already do by PyTorch's default, left as it is); no effect on the CPU.
    """

    kind: Literal["single", "ddp", "deepspeed"] = "single"
    zero_stage: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    offload_optimizer: bool = False
    timeout_s: int = 600
    allow_tf32: bool = False  # GPU speed switch (docs/real-run.md): TF32 for fp32 matmuls; false is PyTorch's default

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
    """wandb logging (train/outputs/run_logging.py). ``online`` is checked before any work
    (train/outputs/wandb_preflight.py): no API key, or a server that does not answer within
    ``check_timeout_s``, stops the run with exit 2, or logs offline with a warning when
    ``fallback_offline``."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "recap-diffusion"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    fallback_offline: bool = False  # mode=online that cannot start: log offline with a warning instead of exit 2
    check_timeout_s: float = 5.0  # mode=online: how long the check before the run waits for the wandb server

    def validate(self) -> None:
        if not self.check_timeout_s > 0:
            raise ConfigError("check_timeout_s", f"must be > 0, got {self.check_timeout_s}")


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

        from train.config.secret_names import is_secret_key

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
    (deepspeed), or as a Slurm batch job (slurm, through `recap launch`); see docs/slurm.md. Stages
    that do not split their work over processes (sample, evaluate, ...) run as one process (under
    Slurm, one per node)."""

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
