"""Config sections of what comes after training: sampling, the prompt rewriter, the end-to-end
pipeline and the sweep report.

Part of the schema; train/config/experiment.py composes the sections into ExperimentConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

from train.config.typed import ConfigError

# What the recipe's "caption upsampling" asks of a chat model (DALL-E 3, section 6 and appendix C):
# turn a short user prompt into the kind of descriptive caption the model was trained on.
DEFAULT_REWRITE_INSTRUCTION = (
    "You rewrite short image prompts into one detailed, literal description of the image, in the style of "
    "a descriptive image caption: name every object with its colour, size, texture and position, the "
    "background, and any written text in quotes. Keep everything the prompt says; add nothing that "
    "contradicts it. Answer with the description only."
)


def _check_endpoint_url(url: str, api_key_env: str | None) -> None:
    """An http(s) URL without credentials in it.

    ``user:password@host`` is refused rather than sent as Basic auth: OpenAI-compatible servers
    (OpenAI, vLLM, llama.cpp, TGI) read their key from ``Authorization: Bearer``, so Basic auth
    would only fail later, at the first prompt, with a 401; and urllib took the credentials for
    part of the host name ("Name or service not known" even for 127.0.0.1). A key in the
    environment also stays out of shell history and Hydra's overrides. The messages echo the URL
    without its credentials."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1:
        raise ConfigError("url", f"expected an http(s)://host[:port]/path URL (e.g. http://127.0.0.1:8000/v1), "
                          f"got '{url.rsplit('@', 1)[-1]}'")  # never the part before an @ (credentials)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    bare = f"{parts.scheme}://{host}{f':{port}' if port else ''}{parts.path}"
    if parts.username is not None or parts.password is not None:
        where = (f"the environment variable rewriter.api_key_env names (now {api_key_env})" if api_key_env else
                 "an environment variable and name it in rewriter.api_key_env")
        raise ConfigError("url", f"has credentials in it (user:password@), which the rewriter does not send; give "
                          f"the URL without them ({bare}) and put the key in {where}: it is sent as "
                          "'Authorization: Bearer <key>'")


@dataclass(frozen=True)
class RewriterConfig:
    """The prompt rewriter run before encoding: ``identity`` (default), or ``openai``: any
    OpenAI-compatible chat-completions endpoint at ``url`` (e.g. http://127.0.0.1:8000/v1; a local
    vLLM or llama.cpp server). The API key is read from the environment variable
    ``api_key_env``, sent as ``Authorization: Bearer`` and never written anywhere; a ``url`` with
    credentials in it (user:password@) is refused."""

    kind: Literal["identity", "openai"] = "identity"
    url: str | None = None
    model: str | None = None
    api_key_env: str | None = "OPENAI_API_KEY"
    instruction: str = DEFAULT_REWRITE_INSTRUCTION
    temperature: float = 0.0
    max_tokens: int = 256
    timeout_s: float = 30.0
    retries: int = 2

    def validate(self) -> None:
        if self.kind == "openai" and (not self.url or not self.model):
            raise ConfigError("url", "rewriter.kind=openai needs rewriter.url (e.g. http://127.0.0.1:8000/v1) "
                              "and rewriter.model")
        if self.kind == "openai" and self.url:
            _check_endpoint_url(self.url, self.api_key_env)
        if self.timeout_s <= 0 or self.retries < 0 or self.max_tokens < 1:
            raise ConfigError("timeout_s", "timeout_s must be > 0, retries >= 0 and max_tokens >= 1")


@dataclass(frozen=True)
class SamplerConfig:
    """How images are drawn from a trained model (`recap sample`, `recap evaluate`).

    ``pipeline``: train-t2i's exported diffusers folder (EMA weights when it trained with EMA);
    ``weights=raw`` swaps in the live weights from ``raw_weights`` (train-t2i's raw_weights/).
    ``scheduler``: ddim, or dpmpp (DPM-Solver++ 2M), both from the training noise schedule."""

    pipeline: str
    raw_weights: str | None = None
    weights: Literal["ema", "raw"] = "ema"
    scheduler: Literal["ddim", "dpmpp"] = "ddim"
    steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    batch_size: int = 8

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError("steps", f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.guidance_scale < 0:
            raise ConfigError("guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        if self.weights == "raw" and not self.raw_weights:
            raise ConfigError("raw_weights", "weights=raw needs raw_weights (train-t2i's <run>/raw_weights folder)")


@dataclass(frozen=True)
class SampleConfig:
    """`recap sample`: prompts (``prompts`` and/or one per line in ``prompts_file``) -> one PNG
    per prompt plus a labelled grid; any size that is a multiple of the model's 64 px (toy: 32)."""

    sampler: SamplerConfig
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    height: int = 256
    width: int = 256
    rewriter: RewriterConfig = field(default_factory=RewriterConfig)

    def validate(self) -> None:
        if self.height < 8 or self.width < 8:
            raise ConfigError("height", f"height and width must be >= 8 pixels, got {self.height}x{self.width}")


@dataclass(frozen=True)
class PipelineConfig:
    """`recap pipeline`: run ``stages`` in order (each as `recap STAGE` with the same overrides),
    skipping those whose outputs are complete; ``force`` reruns the named ones. Writes the run's
    report.md. Under `-m`, stages from train-t2i on run once per sweep point (in the point's
    directory); the ones before are shared."""

    stages: list[str] = field(default_factory=lambda: [
        "make-toy-data", "pretrain-captioner", "finetune-captioner style=ssc", "finetune-captioner style=dsc",
        "evaluate-captioner", "recaption", "train-tokenizer", "train-vae", "cache", "train-t2i", "sample",
        "train-eval-clip", "evaluate"])
    force: list[str] = field(default_factory=list)
    report_examples: int = 4  # images shown with their alt-text, SSC and DSC in report.md

    def validate(self) -> None:
        if not self.stages:
            raise ConfigError("stages", "needs at least one stage")
        unknown = [s for s in self.force if s not in self.stages]
        if unknown:
            raise ConfigError("force", f"{unknown} not in pipeline.stages {self.stages}")
        if self.report_examples < 0:
            raise ConfigError("report_examples", f"must be >= 0, got {self.report_examples}")


@dataclass(frozen=True)
class SweepReportConfig:
    """`recap sweep-report`: gather every point of a sweep (``sweep``: a sweep directory such as
    runs/toy/sweeps/pipeline) into a table and a plot of CLIP score and attribute accuracy against
    ``x`` (a config key that the sweep varied). ``prompts``: drawn from the same noise by the
    first point of every swept value into grid.png (the paper's side-by-side; [] for none);
    ``heldout_examples``: the first N samples of ``evaluate.input`` (as `recap evaluate` reads
    them: the real image and its DSC) drawn the same way into heldout.png, the real image first
    (0 for none); ``size`` x ``size`` pixels, DDIM with ``steps`` steps and ``guidance_scale``
    (conf: `recap sample`'s, as evaluate's in the toy)."""

    sweep: str
    x: str = "caption_mix.dsc"
    prompts: list[str] = field(default_factory=list)
    heldout_examples: int = 0
    size: int = 128
    steps: int = 20
    guidance_scale: float = 5.0

    def validate(self) -> None:
        if self.guidance_scale < 0:
            raise ConfigError("guidance_scale", f"must be >= 0, got {self.guidance_scale}")
        if self.size < 8 or self.steps < 1:
            raise ConfigError("size", f"size must be >= 8 and steps >= 1, got {self.size} and {self.steps}")
        if self.heldout_examples < 0:
            raise ConfigError("heldout_examples", f"must be >= 0, got {self.heldout_examples}")
