"""`recap sample`: prompts in, PNGs + grid + prompts.jsonl out; seeds per image; EMA vs raw
weights; DDIM and DPM-Solver++; the prompt rewriter against a local OpenAI-compatible stand-in."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.caption_tokenizer import train_caption_tokenizer
from models.diffusion import make_scheduler
from models.pipeline import export_pipeline
from models.text_conditioning import CaptionTransformer, build_t5_encoder
from models.unet import build_unet
from models.vae import build_vae
from models.denoiser import CaptionConditionedUNet
from tests.helpers import assert_close_to_scale, run_recap, run_stage
from train.config.sampling import RewriterConfig, SamplerConfig
from train.t2i.prompt_rewriter import ChatRewriter, RewriteError, build_rewriter
from train.stages.sample import read_prompts
from train.t2i.export import RAW_IS_EXPORT, export_raw_weights
from train.t2i.sampling import generate, load_sampler
from train.config.typed import ConfigError

PROMPTS = ["a red circle", "a blue striped square in the top left", "the word cat"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny exported pipeline (as train-t2i writes it) with raw weights that differ from it."""
    root = tmp_path_factory.mktemp("t2i")
    texts = [f"a {c} {s} in the top left" for c in ("red", "blue", "green") for s in ("circle", "square", "cat")]
    tokenizer = train_caption_tokenizer(texts + ["the word cat", "striped"], vocab_size=120, max_tokens=16)
    torch.manual_seed(0)
    xf = CaptionTransformer(text_dim=32, width=16, layers=1, heads=2, pooled_dim=16).eval()
    unet = build_unet(block_out_channels=[32, 64], attention_levels=[False, True], layers_per_block=1,
                      attention_head_dim=8, cross_attention_dim=16, pooled_dim=16, norm_num_groups=32).eval()
    export_pipeline(root / "pipeline", tokenizer=tokenizer, caption_transformer=xf, unet=unet,
                    text_encoder=build_t5_encoder(pretrained=None, vocab_size=len(tokenizer), architecture=dict(
                        d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)),
                    vae=build_vae([32, 32, 32, 32], layers_per_block=1, norm_num_groups=16).eval(),
                    scheduler=make_scheduler(prediction_type="epsilon", beta_schedule="linear",
                                             num_train_timesteps=1000))
    raw = CaptionConditionedUNet(xf, unet)
    with torch.no_grad():
        for p in raw.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_raw_weights(root / "raw_weights", raw)
    return root


def _options(trained: Path, **kw) -> SamplerConfig:
    base = dict(pipeline=str(trained / "pipeline"), raw_weights=str(trained / "raw_weights"), steps=3,
                guidance_scale=3.0, batch_size=2)
    return SamplerConfig(**{**base, **kw})


def _generate(pipe, prompts: list[str], batch_size: int = 2, seed: int = 0) -> torch.Tensor:
    return generate(pipe, prompts, height=32, width=64, steps=3, guidance_scale=3.0, seed=seed, batch_size=batch_size)


def test_images_depend_on_prompt_and_index_not_on_batching(trained: Path) -> None:
    pipe = load_sampler(_options(trained), torch.device("cpu"))
    batched = _generate(pipe, PROMPTS, batch_size=2)
    single = _generate(pipe, PROMPTS, batch_size=1)
    assert batched.shape == (3, 3, 32, 64)
    assert_close_to_scale(batched, single)
    more = _generate(pipe, PROMPTS + ["a green cat"], batch_size=4)  # appending leaves earlier images alone
    assert_close_to_scale(more[:3], batched)
    assert (batched[0] - batched[1]).abs().max() > 1e-3


def test_raw_weights_and_schedulers(trained: Path) -> None:
    ema = load_sampler(_options(trained), torch.device("cpu"))
    raw = load_sampler(_options(trained, weights="raw"), torch.device("cpu"))
    saved = CaptionTransformer.from_pretrained(str(trained / "raw_weights" / "caption_transformer"))
    for name, tensor in saved.state_dict().items():
        assert torch.equal(raw.caption_transformer.state_dict()[name], tensor), name
    assert (_generate(ema, PROMPTS[:1]) - _generate(raw, PROMPTS[:1])).abs().max() > 1e-3
    dpm = load_sampler(_options(trained, scheduler="dpmpp"), torch.device("cpu"))
    assert type(dpm.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert dpm.scheduler.config.algorithm_type == "dpmsolver++"
    assert type(ema.scheduler).__name__ == "DDIMScheduler"
    assert dpm.scheduler.config.beta_schedule == ema.scheduler.config.beta_schedule == "linear"
    assert (_generate(ema, PROMPTS[:1]) - _generate(dpm, PROMPTS[:1])).abs().max() > 1e-4


def test_raw_weights_of_a_run_without_ema_are_the_export(trained: Path, tmp_path: Path) -> None:
    export_raw_weights(tmp_path / "raw", None)
    assert (tmp_path / "raw" / RAW_IS_EXPORT).is_file()
    plain = load_sampler(_options(trained, weights="raw", raw_weights=str(tmp_path / "raw")), torch.device("cpu"))
    ema = load_sampler(_options(trained), torch.device("cpu"))
    torch.testing.assert_close(_generate(plain, PROMPTS[:1]), _generate(ema, PROMPTS[:1]), atol=0, rtol=0)
    with pytest.raises(ConfigError, match="sampler.raw_weights.*no unet"):
        load_sampler(_options(trained, weights="raw", raw_weights=str(tmp_path / "nothing")), torch.device("cpu"))
    with pytest.raises(ConfigError, match="sampler.pipeline.*recap train-t2i"):
        load_sampler(_options(trained, pipeline=str(tmp_path)), torch.device("cpu"))


def test_read_prompts(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("# my prompts\na green cat\n\n  a red star  \n")
    assert read_prompts(["one"], str(tmp_path / "p.txt")) == ["one", "a green cat", "a red star"]
    with pytest.raises(ConfigError, match="sample.prompts_file"):
        read_prompts([], str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="no prompts"):
        read_prompts(["  "], None)


def _stage_args(root: Path, trained: Path, *extra: str) -> list[str]:
    return [f"run.root={root}", f"sample.sampler.pipeline={trained / 'pipeline'}",
            f"sample.sampler.raw_weights={trained / 'raw_weights'}", "sample.sampler.steps=3", "sample.height=32",
            "sample.width=64", "logger.progress=false", "logger.wandb.mode=disabled", *extra]


def test_sample_stage_writes_pngs_grid_and_prompt_log(trained: Path, tmp_path: Path) -> None:
    (tmp_path / "prompts.txt").write_text("a green cat\n")
    summary = run_stage("sample", _stage_args(tmp_path, trained, f"sample.prompts_file={tmp_path / 'prompts.txt'}",
                                              "sample.prompts=[a red circle,the word cat]"))
    run_dir = tmp_path / "toy" / "sample"
    records = [json.loads(line) for line in (run_dir / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a red circle", "the word cat", "a green cat"]
    assert [r["seed"] for r in records] == [0, 1, 2]
    assert all(r["rewritten"] == r["prompt"] for r in records)
    images = [np.asarray(Image.open(r["file"])) for r in records]
    assert all(im.shape == (32, 64, 3) and im.dtype == np.uint8 for im in images)
    pipe = load_sampler(_options(trained), torch.device("cpu"))
    expected = generate(pipe, ["a red circle"], height=32, width=64, steps=3, guidance_scale=5.0, seed=0, batch_size=1)
    assert np.abs((expected[0] * 255).round().permute(1, 2, 0).numpy() - images[0]).max() <= 1
    grid = Image.open(run_dir / "grid.png")
    assert grid.size[0] == 3 * (64 + 4) + 4 and grid.size[1] > 32
    assert summary["images"] == 3 and summary["scheduler"] == "ddim" and summary["rewritten"] == 0


def test_sample_stage_rejects_a_size_off_the_grid(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sample.height.*multiples of 16"):
        run_stage("sample", _stage_args(tmp_path, trained, "sample.prompts=[a]", "sample.height=40"))


class _StandIn:
    """A tiny OpenAI-compatible chat-completions server on 127.0.0.1 (the real protocol, fake model)."""

    def __init__(self, fail_first: int = 0, status: int = 503) -> None:
        self.requests: list[dict] = []
        self.fail_first, self.status = fail_first, status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if len(server.requests) <= server.fail_first:
                    self.send_response(server.status)
                    self.end_headers()
                    return
                prompt = body["messages"][-1]["content"]
                answer = {"choices": [{"index": 0, "message": {"role": "assistant",
                                                                "content": f"A detailed picture of {prompt}, centred."}}]}
                data = json.dumps(answer).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "_StandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_chat_rewriter_speaks_the_openai_protocol(monkeypatch) -> None:
    monkeypatch.setenv("MY_LLM_KEY", "sk-test-123456")
    with _StandIn(fail_first=1) as server:
        rewrite = build_rewriter(RewriterConfig(kind="openai", url=server.url + "/", model="upsampler",
                                                api_key_env="MY_LLM_KEY", retries=1))
        assert rewrite("a cat") == "A detailed picture of a cat, centred."
    assert len(server.requests) == 2  # the 503 was retried once
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test-123456"
    assert request["body"]["model"] == "upsampler" and request["body"]["temperature"] == 0.0
    assert [m["role"] for m in request["body"]["messages"]] == ["system", "user"]
    assert request["body"]["messages"][1]["content"] == "a cat"


def test_chat_rewriter_errors_are_clear_and_not_retried_when_final() -> None:
    with _StandIn(fail_first=5, status=400) as server:
        rewrite = ChatRewriter(RewriterConfig(kind="openai", url=server.url, model="m", retries=3))
        with pytest.raises(RewriteError, match=r"rewriter at http://127.0.0.1:\d+/v1/chat/completions.*HTTP 400"):
            rewrite("x")
    assert len(server.requests) == 1
    closed = ChatRewriter(RewriterConfig(kind="openai", url=server.url, model="m", retries=0, timeout_s=2))
    with pytest.raises(RewriteError, match="failed after 1 tries"):
        closed("x")  # the server is gone


def test_openai_rewriter_needs_url_and_model() -> None:
    with pytest.raises(ConfigError, match="url"):
        RewriterConfig(kind="openai", model="m").validate()


def test_rewriter_url_with_credentials_is_refused_with_where_the_key_goes() -> None:
    with pytest.raises(ConfigError) as caught:
        RewriterConfig(kind="openai", url="http://alice:Pw0rd-xyz@127.0.0.1:8000/v1", model="m",
                       api_key_env="MY_LLM_KEY").validate()
    assert str(caught.value) == (
        "url: has credentials in it (user:password@), which the rewriter does not send; give the URL without them "
        "(http://127.0.0.1:8000/v1) and put the key in the environment variable rewriter.api_key_env names (now "
        "MY_LLM_KEY): it is sent as 'Authorization: Bearer <key>'")
    for url in ("127.0.0.1:8000/v1", "ftp://alice:Pw0rd-xyz@host/v1", "http://host:port/v1"):
        with pytest.raises(ConfigError, match=r"^url: expected an http\(s\)://host\[:port\]/path URL") as caught:
            RewriterConfig(kind="openai", url=url, model="m").validate()
        assert "Pw0rd" not in str(caught.value)


def test_sample_refuses_a_rewriter_url_with_credentials_before_connecting(tmp_path: Path) -> None:
    """The CLI: exit 2 and one line before any work; the server never sees a request, and the
    password is in no output and no file."""
    password = "Sup3r-S3cret-pw"
    with _StandIn() as server:
        url = server.url.replace("http://", f"http://alice:{password}@")
        result = run_recap(["sample", f"run.root={tmp_path}", "sample.sampler.pipeline=/nonexistent",
                            "sample.prompts=[a cat]", "logger.wandb.mode=disabled", "sample.rewriter.kind=openai",
                            f"sample.rewriter.url={url}", "sample.rewriter.model=upsampler"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and server.requests == []
    assert result.stderr.splitlines() == [
        "recap sample: error: sample.rewriter.url: has credentials in it (user:password@), which the rewriter does "
        f"not send; give the URL without them ({server.url}) and put the key in the environment variable "
        "rewriter.api_key_env names (now OPENAI_API_KEY): it is sent as 'Authorization: Bearer <key>'"]
    assert password not in result.stdout + result.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_sample_stage_rewrites_prompts_and_keeps_the_key_out_of_files(trained: Path, tmp_path: Path,
                                                                      monkeypatch) -> None:
    monkeypatch.setenv("MY_LLM_KEY", "sk-secret-987654")
    with _StandIn() as server:
        summary = run_stage("sample", _stage_args(tmp_path, trained, "sample.prompts=[a red circle]",
                                                  "sample.rewriter.kind=openai", f"sample.rewriter.url={server.url}",
                                                  "sample.rewriter.model=upsampler",
                                                  "sample.rewriter.api_key_env=MY_LLM_KEY"))
    run_dir = tmp_path / "toy" / "sample"
    record = json.loads((run_dir / "prompts.jsonl").read_text())
    assert record["prompt"] == "a red circle"
    assert record["rewritten"] == "A detailed picture of a red circle, centred."
    assert summary["rewritten"] == 1 and server.requests[0]["auth"] == "Bearer sk-secret-987654"
    written = "".join(p.read_text(errors="ignore") for p in run_dir.rglob("*") if p.is_file() and p.suffix != ".png")
    assert "sk-secret-987654" not in written


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sampler_loads_in_its_dtype_without_diffusers_cast_warning(trained: Path, dtype: torch.dtype) -> None:
    """Loaded in the dtype (not cast after loading), so diffusers does not warn, on every load,
    that modules "should be kept in float32: []"."""
    import logging

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    records = Records()
    logging.getLogger("diffusers").addHandler(records)  # diffusers' loggers do not reach the root
    try:
        for weights in ("ema", "raw"):
            pipe = load_sampler(_options(trained, weights=weights), torch.device("cpu"), dtype)
            assert {n: getattr(pipe, n).dtype for n in ("unet", "vae", "text_encoder", "caption_transformer")} == {
                n: dtype for n in ("unet", "vae", "text_encoder", "caption_transformer")}
    finally:
        logging.getLogger("diffusers").removeHandler(records)
    assert [m for m in records.messages if "kept in float32" in m] == []
