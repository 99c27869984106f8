"""`recap recaption` through the CLI: outputs, exactly-once under SIGKILL, rank splits, bad
arguments, failures and their retry. Captioners are tiny random CoCas exported in open_clip's
format; captions are short (max_length 10) since their content is not under test here."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import torch
import webdataset as wds

from data_pipeline import recaption as rc
from data_pipeline.ground_truth import GroundTruthAccess
from data_pipeline.options import ReaderOptions
from data_pipeline.samples import SampleSpec
from data_pipeline.shard_reader import ShardReader
from models.caption_decoding import decode_text, generate_tokens
from models.captioner import build_captioner, export_captioner, image_transform, load_exported, tokenizer
from models.decoding_options import DecodingOptions
from tests.data_pipeline.dp_testlib import (fault_members, fault_shard, good_members, jpeg_bytes, read_members,
                                            write_tar)
from tests.helpers import TINY_COCA, run_recap
from train.config.typed import ConfigError

pytestmark = pytest.mark.slow
TOY_SHARDS, TOY_SAMPLES = 8, 16  # tests/conftest.py SMALL_TOY
FAULTS = {"bad_json": 1, "duplicate_key": 1, "empty_image": 1, "missing_image": 1, "truncated_tar": 1,
          "undecodable_image": 1, "image_too_large": 1}
TIMING = ("seconds", "images_per_s")


class Setup:
    def __init__(self, root: Path, toy_data: Path) -> None:
        self.root, self.input = root, root / "input"
        shutil.copytree(toy_data / "train", self.input)
        fault_shard(self.input / "fault.tar")
        self.captioners = {}
        for seed, key in enumerate(["ssc", "dsc"]):
            torch.manual_seed(seed)
            path = export_captioner(build_captioner("coca_ViT-B-32", TINY_COCA), TINY_COCA, root / key / "captioner",
                                    "coca_ViT-B-32")
            self.captioners[key] = path

    def args(self, output: Path, *extra: str) -> list[str]:
        return ["recaption", f"run.root={self.root / 'runs'}", f"recaption.input={self.input}",
                f"recaption.output={output}", *(f"recaption.captioners.{k}={p}" for k, p in self.captioners.items()),
                "recaption.batch_size=8", "recaption.num_workers=2", "recaption.decoding.max_length=10",
                "logger.progress=false", "logger.wandb.mode=disabled", *extra]

    def run(self, output: Path, *extra: str, env: dict[str, str] | None = None, code: int = 0) -> str:
        """The CLI in a subprocess (for kills, torchrun and exit codes)."""
        result = run_recap(self.args(output, *extra), env=env)
        assert result.returncode == code, result.stderr[-3000:]
        return result.stderr

    def run_here(self, output: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
        """The stage in this process (no interpreter start-up): its summary."""
        from train.config.loading import check_overrides
        from train.stages.recaption import run

        with pytest.MonkeyPatch.context() as patch:
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            return run(check_overrides(self.args(output, *extra)[1:]), self.root / "runs" / "toy" / "recaption")


@pytest.fixture(scope="module")
def setup(toy_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    return Setup(tmp_path_factory.mktemp("recaption"), toy_data)


@pytest.fixture(scope="module")
def reference(setup: Setup) -> Path:
    """An uninterrupted single-process run."""
    out = setup.root / "reference"
    setup.run_here(out)
    return out


def _summary(setup: Setup, name: str = "summary.json") -> dict:
    return json.loads((setup.root / "runs" / "toy" / "recaption" / name).read_text())


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _stats(out: Path) -> dict[str, dict]:
    return {p.name: {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMING}
            for p in sorted(out.glob(f"*{rc.STATS_SUFFIX}"))}


def test_outputs_keep_every_member_and_add_captions_with_lineage(setup: Setup, reference: Path) -> None:
    summary = _summary(setup)
    assert (summary["shards_written"], summary["images_captioned"]) == (TOY_SHARDS + 1, TOY_SHARDS * TOY_SAMPLES + 3)
    assert summary["failures_by_reason"] == FAULTS and summary["duplicate_keys_across_shards"] == 0
    sha = {k: hashlib.sha256((p / "open_clip_model.safetensors").read_bytes()).hexdigest()
           for k, p in setup.captioners.items()}
    for shard in sorted(setup.input.glob("0*.tar")):
        given, out = dict(read_members(shard)), dict(read_members(reference / shard.name))
        keys = {name.split(".", 1)[0] for name in given}
        assert len(keys) == TOY_SAMPLES
        assert set(out) == set(given) | {f"{k}.{c}.txt" for k in keys for c in ("ssc", "dsc")}
        for name, data in given.items():
            if name.endswith(".json"):
                meta = json.loads(out[name])
                lineage = meta.pop("recaption")
                assert meta == json.loads(data)
                assert {k: v["captioner_sha256"] for k, v in lineage.items()} == sha
                assert lineage["dsc"]["decoding"]["max_length"] == 10
            else:
                assert out[name] == data, name  # byte-for-byte
        stats = rc.read_stats(reference / shard.name)
        assert (stats["input_samples"], stats["written"], stats["failures"]) == (TOY_SAMPLES, TOY_SAMPLES, [])
    fault = rc.read_stats(reference / "fault.tar")
    assert fault["failures_by_reason"] == FAULTS and rc.output_keys(reference / "fault.tar") == {"k0", "k3", "k6"}
    assert {f["key"]: f["reason"] for f in fault["failures"]} == fault_shard(setup.root / "again.tar")[1]


def test_captions_equal_the_decoder_on_the_same_batch(setup: Setup, reference: Path) -> None:
    """The first batch of shard 0 (8 images), captioned directly: the same text, member by member."""
    from data_pipeline.shard_io import decode_image

    members = read_members(setup.input / "00000.tar")
    keys = sorted({name.split(".", 1)[0] for name, _ in members})[:8]
    images = {name.split(".", 1)[0]: decode_image(data) for name, data in members if name.endswith(".jpg")}
    out = dict(read_members(reference / "00000.tar"))
    for key_name, path in setup.captioners.items():
        model = load_exported(path).eval()
        batch = torch.stack([image_transform(model)(images[k]) for k in keys])
        with torch.inference_mode():
            ids = generate_tokens(model, batch, DecodingOptions(max_length=10))
        assert [decode_text(t, tokenizer(model)) for t in ids] == [out[f"{k}.{key_name}.txt"].decode() for k in keys]


def test_outputs_read_back_with_webdataset_and_our_reader(setup: Setup, reference: Path) -> None:
    urls = [str(p) for p in sorted(reference.glob("*.tar"))]
    plain = {s["__key__"]: s["dsc.txt"].decode() for s in wds.WebDataset(urls, shardshuffle=False)}
    assert len(plain) == TOY_SHARDS * TOY_SAMPLES + 3  # + k0, k3, k6 of fault.tar
    reader = ShardReader(urls, spec=SampleSpec(GroundTruthAccess.NONE, captions=("dsc.txt", "ssc.txt")),
                         options=ReaderOptions(num_workers=0), batch_size=16, seed=0, epochs=1, collate=list)
    ours = {s["__key__"]: s["dsc.txt"] for batch in reader for s in batch}
    assert len(ours) == TOY_SHARDS * TOY_SAMPLES + 3 and reader.fault_counts() == {}
    assert ours == plain


def test_sigkill_anywhere_then_rerun_is_byte_identical_and_a_third_run_does_nothing(setup: Setup,
                                                                                     reference: Path) -> None:
    out = setup.root / "killed"
    setup.run(out, env={"RECAP_FAULT": "sigkill@recaption_batch=5"}, code=-9)  # mid-shard
    assert list(out.glob(".*.partial")) and len(list(out.glob(f"*{rc.STATS_SUFFIX}"))) < TOY_SHARDS + 1
    setup.run(out, env={"RECAP_FAULT": "sigkill@recaption_shard=1"}, code=-9)  # renamed, stats not yet written
    done_before = len(list(out.glob(f"*{rc.STATS_SUFFIX}")))
    assert len(list(out.glob("*.tar"))) == done_before + 1
    setup.run(out)
    assert _summary(setup)["shards_written"] == TOY_SHARDS + 1 - done_before
    assert _shards(out) == _shards(reference) and _stats(out) == _stats(reference)
    assert not list(out.glob(".*.partial"))
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    summary = setup.run_here(out)
    assert (summary["shards_written"], summary["shards_already_done"], summary["images_captioned"]) == (0, 9, 0)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_slurm_array_and_torchrun_splits_cover_every_shard_once(setup: Setup, reference: Path) -> None:
    array = setup.root / "array"
    for task in range(3):
        summary = setup.run_here(array, env={"SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_TASK_COUNT": "3"})
        assert (summary["rank"], summary["world_size"], summary["shards_written"]) == (task, 3, 3)
        assert _summary(setup, f"summary.rank{task}.json") == json.loads(json.dumps(summary))
    assert _shards(array) == _shards(reference)
    assert {n: {k: v for k, v in s.items() if k not in ("rank", "world_size")} for n, s in _stats(array).items()} \
        == {n: {k: v for k, v in s.items() if k not in ("rank", "world_size")} for n, s in _stats(reference).items()}
    torchrun = setup.root / "torchrun"
    setup.run(torchrun, "launcher=torchrun", "launcher.nproc_per_node=2", "runtime=ddp")
    assert [_summary(setup, f"summary.rank{r}.json")["shards_written"] for r in range(2)] == [5, 4]
    assert _shards(torchrun) == _shards(reference)
    assert {s["rank"] for s in _stats(torchrun).values()} == {0, 1}


@pytest.mark.parametrize(("override", "message"), [
    ("recaption.input={root}/nowhere", r"recaption.input: shard directory .*nowhere does not exist"),
    ("recaption.output={input}", r"recaption.output: .* holds the input shards"),
    ("recaption.keys=[ssc,long]", r"recaption.keys: unknown caption key 'long'; keys with a captioner: ssc, dsc"),
    ("recaption.keys=[json] +recaption.captioners.json={root}/ssc/captioner", r"recaption.keys: 'json' cannot be a caption key"),
    ("recaption.keys=[gt_dsc] +recaption.captioners.gt_dsc={root}/dsc/captioner", r"'gt_dsc' cannot be a caption key"),
    ("recaption.captioners.dsc={root}/missing", r"recaption.captioners.dsc: .*missing is not an exported captioner"),
    ("recaption.rank=1", r"recaption.rank: set both rank and world_size, or neither"),
])
def test_bad_arguments_are_refused_before_any_work(setup: Setup, override: str, message: str) -> None:
    from train.config.loading import check_overrides
    from train.stages.recaption import check

    out = setup.root / "never"
    cfg = check_overrides([*setup.args(out)[1:], *override.format(root=setup.root, input=setup.input).split()])
    with pytest.raises(ConfigError, match=message):
        check(cfg)
    assert not out.exists()


def test_a_bad_argument_exits_2_with_one_line_before_torchrun_starts(setup: Setup) -> None:
    out = setup.root / "never"
    result = run_recap([*setup.args(out), "recaption.keys=[ssc,long]", "launcher=torchrun",
                        "launcher.nproc_per_node=2", "runtime=ddp"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["recap recaption: error: recaption.keys: unknown caption key 'long'; "
                                                  "keys with a captioner: ssc, dsc (add one: +recaption.captioners.long=DIR)"]
    assert not out.exists()


def test_only_failures_redoes_just_the_failed_keys(setup: Setup, reference: Path, tmp_path: Path) -> None:
    """After the input shard is re-fetched whole with k1's image repaired, only k1 and k7 (cut
    off before) are captioned; what was written is copied byte-for-byte."""
    fixed_input, out = tmp_path / "input", tmp_path / "out"
    write_tar(fixed_input / "fault.tar", [(n, jpeg_bytes() if n == "k1.jpg" else d) for n, d in fault_members()])
    out.mkdir()
    for name in ("fault.tar", "fault" + rc.STATS_SUFFIX):
        shutil.copy(reference / name, out / name)
    before = dict(read_members(out / "fault.tar"))
    setup.run_here(out, f"recaption.input={fixed_input}", "recaption.only_failures=true")
    stats = rc.read_stats(out / "fault.tar")
    assert (stats["copied_from_previous"], stats["captioned"], stats["input_samples"]) == (3, 2, 10)
    assert stats["failures_by_reason"] == {"bad_json": 1, "duplicate_key": 1, "empty_image": 1, "missing_image": 1,
                                           "image_too_large": 1}
    after = read_members(out / "fault.tar")
    assert [n for n, _ in after if n.endswith(".jpg")] == ["k0.jpg", "k1.jpg", "k3.jpg", "k6.jpg", "k7.jpg"]
    assert all(before[n] == d for n, d in after if n[:2] not in ("k1", "k7"))  # copied byte-for-byte
    assert dict(after)["k1.dsc.txt"] and dict(after)["k7.ssc.txt"]
    assert setup.run_here(out, f"recaption.input={fixed_input}")["shards_written"] == 0  # done: nothing to redo


def test_train_tokenizer_learns_from_the_recaptioned_shards(setup: Setup, reference: Path, tmp_path: Path) -> None:
    """The next stage's consumer: a T5 tokenizer fitted on txt + ssc + dsc of the output shards."""
    from data_pipeline.caption_tokenizer import load_tokenizer
    from train.config.loading import check_overrides
    from train.stages.train_tokenizer import run

    cfg = check_overrides([f"run.root={setup.root / 'runs'}", f"train_tokenizer.input={reference}",
                           f"text_encoder.tokenizer={tmp_path / 'tok'}", "train_tokenizer.vocab_size=400",
                           "logger.progress=false", "data.reader.num_workers=0"])
    summary = run(cfg, tmp_path / "run")
    texts = {"ssc": [], "dsc": [], "txt": []}
    for shard in sorted(reference.glob("*.tar")):
        for name, data in read_members(shard):
            key = {"ssc.txt": "ssc", "dsc.txt": "dsc", "txt": "txt"}.get(name.split(".", 1)[1])
            if key and data.decode().strip():
                texts[key].append(data.decode())
    assert summary["texts_by_key"] == {k: len(v) for k, v in texts.items() if v}
    tok = load_tokenizer(tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id, len(tok)) == (0, 1, summary["vocab_size"])
    caption = texts["txt"][0]
    assert tok.decode(tok(caption)["input_ids"], skip_special_tokens=True) == caption.strip()
    pretrained = check_overrides([f"run.root={setup.root / 'runs'}", "text_encoder=t5_xxl"])
    with pytest.raises(ConfigError, match="brings its own tokenizer"):
        run(pretrained, tmp_path / "run2")


def test_shards_that_are_not_tar_archives_fail_and_are_never_done(setup: Setup, tmp_path: Path) -> None:
    """A random-bytes .tar, an HTML error page saved as .tar (what a failed download leaves) and a
    text file: exit 3 naming each; the good shard is written and done, the bad ones are not
    (no empty output shard, no marker), so the rerun after fixing them writes just those."""
    given, out = tmp_path / "given", tmp_path / "out"
    given.mkdir()
    shutil.copy(setup.input / "00000.tar", given / "00000.tar")
    (given / "00001.tar").write_bytes(bytes(range(256)) * 12)
    (given / "00002.tar").write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    stderr = setup.run(out, f"recaption.input={given}", code=3)
    assert stderr.strip().splitlines()[-1] == (
        "recap recaption: error: 2 input shard(s) could not be read and were not written: "
        "00001.tar (not_a_tar: its first 512 bytes are not a tar header); 00002.tar (not_a_tar: its first 512 bytes "
        "are not a tar header). The other 1 written shard(s) are done; replace or remove these and rerun the same "
        "command")
    assert "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.recaption.json", "00000.tar"]
    for name in ("00001.tar", "00002.tar"):
        shutil.copy(setup.input / name, given / name)
    summary = setup.run_here(out, f"recaption.input={given}")
    assert (summary["shards_written"], summary["shards_already_done"], summary["failures"]) == (2, 1, 0)

    text = tmp_path / "passwd"  # recaption.input=/etc/passwd wrote an empty shard named passwd
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    stderr = setup.run(tmp_path / "out2", f"recaption.input={text}", code=3)
    assert "passwd (not_a_tar: its first 512 bytes are not a tar header)" in stderr
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())


def _done_and_partial(out: Path) -> tuple[list[str], list[str], list[str]]:
    """(output shards, done markers, partial files) in ``out``, as sorted stems/names."""
    return (sorted(p.name.removesuffix(".tar") for p in out.glob("*.tar")),
            sorted(p.name.removesuffix(rc.STATS_SUFFIX) for p in out.glob(f"*{rc.STATS_SUFFIX}")),
            sorted(p.name for p in out.glob(".*.partial")))


def _preempted_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("recap recaption: preempted by ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def test_sigterm_mid_shard_exits_75_abandoning_the_shard_and_the_rerun_is_byte_identical(setup: Setup,
                                                                                         reference: Path) -> None:
    """SIGTERM to the job's process group (as Slurm and torchrun send it; the DataLoader workers
    get it too) in the middle of a shard: exit 75 with one line saying what is done and what was
    abandoned; only complete, marked shards are left; the rerun completes byte-identically."""
    out = setup.root / "preempted"
    line = _preempted_line(setup.run(out, env={"RECAP_FAULT": "sigterm@recaption_batch=5,group=1"}, code=75))
    tars, done, partial = _done_and_partial(out)
    assert tars == done and partial == [] and 0 < len(done) < TOY_SHARDS
    abandoned = sorted(set(_shards(reference)) - {f"{d}.tar" for d in done})
    assert line.startswith(f"recap recaption: preempted by SIGTERM: {len(done)} shard(s) written and marked done in "
                           "this run; abandoned "), line
    named = re.search(r"in progress \(([^)]*)\), their partial files removed; rerun the same command", line)
    assert named is not None, line
    named = named.group(1).split(", ")
    assert named and set(named) <= set(abandoned), (named, abandoned)
    assert not (setup.root / "runs" / "toy" / "recaption" / "summary.json").exists() or \
        json.loads((setup.root / "runs" / "toy" / "recaption" / "summary.json").read_text())["output"] != str(out)
    setup.run(out)
    assert _shards(out) == _shards(reference) and _stats(out) == _stats(reference)


def test_sigusr1_to_an_array_task_between_rename_and_marker_still_marks_that_shard_done(setup: Setup,
                                                                                       reference: Path) -> None:
    """SIGUSR1 (Slurm's time-limit warning) arriving while shard 2's stats file is being written:
    the write completes, the task stops before its next batch with exit 75, and the array
    reruns to the reference bytes."""
    out = setup.root / "array_preempted"
    array = {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
    line = _preempted_line(setup.run(out, env={**array, "RECAP_FAULT": "sigusr1@recaption_shard=2"}, code=75))
    tars, done, partial = _done_and_partial(out)
    assert line.startswith("recap recaption: preempted by SIGUSR1: 2 shard(s) written and marked done in this run;")
    assert len(done) == 2 and tars == done and partial == []
    for task in ("0", "1"):
        setup.run_here(out, env={**array, "SLURM_ARRAY_TASK_ID": task})
    assert _shards(out) == _shards(reference)
    assert {n: {k: v for k, v in s.items() if k not in ("rank", "world_size")} for n, s in _stats(out).items()} \
        == {n: {k: v for k, v in s.items() if k not in ("rank", "world_size")} for n, s in _stats(reference).items()}


def test_a_preempted_rank_under_torchrun_makes_the_job_exit_75(setup: Setup, reference: Path) -> None:
    """Rank 1 of 2 is signalled (its process group, as torchrun forwards it): rank 1 exits 75,
    rank 0 finishes; the job's exit code is 75 (requeue), and the rerun completes it."""
    out = setup.root / "torchrun_preempted"
    torchrun = ("launcher=torchrun", "launcher.nproc_per_node=2", "runtime=ddp")
    stderr = setup.run(out, *torchrun, env={"RECAP_FAULT": "sigterm@recaption_batch=2,rank=1,group=1"}, code=75)
    # torchrun's ChildFailedError for a rank that exits non-zero ends in one line, not a traceback
    assert "recap recaption: preempted by SIGTERM: " in stderr, stderr[-3000:]
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    (ended,) = [line for line in stderr.splitlines() if line.startswith("torchrun: ")]
    assert "rank 1 exited 75" in ended, ended
    tars, done, partial = _done_and_partial(out)
    assert tars == done and partial == [] and len(done) < TOY_SHARDS + 1
    setup.run(out, *torchrun)
    assert _shards(out) == _shards(reference)


REPEATS = {"00000.tar": ["a1", "a2", "a3"], "00001.tar": ["b1", "a1", "a2"], "00002.tar": ["a2", "c1"]}


def test_keys_repeated_across_shards_are_counted_and_every_copy_is_written(setup: Setup, tmp_path: Path) -> None:
    """Shard 2 repeats a1 and a2 of shard 1, shard 3 repeats a2 again: 3 counted (not failures),
    in one warning line; every output shard keeps all its samples. With 2 workers (shards finish
    in any order) the count is the same. Unique keys count 0; a rerun that writes only 00002.tar
    does not compare it with the shards done before."""
    given, out = tmp_path / "given", tmp_path / "out"
    for name, keys in REPEATS.items():
        write_tar(given / name, [m for k in keys for m in good_members(k)])
    log = setup.root / "runs" / "toy" / "recaption" / "logs" / "recaption.rank0.log"
    before = log.stat().st_size if log.exists() else 0  # the log of this module's earlier runs
    summary = setup.run_here(out, f"recaption.input={given}", "recaption.num_workers=0")
    assert (summary["duplicate_keys_across_shards"], summary["failures"], summary["images_captioned"]) == (3, 0, 8)
    for name, keys in REPEATS.items():
        assert [n for n, _ in read_members(out / name) if n.endswith(".dsc.txt")] == [f"{k}.dsc.txt" for k in keys]
    lines = log.read_bytes()[before:].decode().splitlines()
    assert [line.split(" WARNING ", 1)[1] for line in lines if " WARNING " in line] == [
        "3 key(s) were written to more than one of the 3 output shards this process wrote (each shard keeps its copy; "
        "shards done before are not compared), e.g. a1 (00000.tar, 00001.tar), a2 (00000.tar, 00001.tar), "
        "a2 (00000.tar, 00002.tar)"]
    workers = setup.run_here(tmp_path / "workers", f"recaption.input={given}", "recaption.num_workers=2")
    assert (workers["duplicate_keys_across_shards"], workers["images_captioned"]) == (3, 8)

    (out / ("00002" + rc.STATS_SUFFIX)).unlink()
    rerun = setup.run_here(out, f"recaption.input={given}")
    assert (rerun["shards_written"], rerun["duplicate_keys_across_shards"]) == (1, 0)
    unique = tmp_path / "unique"
    for i, name in enumerate(REPEATS):
        write_tar(unique / name, [m for k in ("x", "y") for m in good_members(f"{k}{i}")])
    assert setup.run_here(tmp_path / "out_unique", f"recaption.input={unique}")["duplicate_keys_across_shards"] == 0


def test_a_job_overlapping_a_live_jobs_shards_is_refused_and_array_tasks_share_the_output(setup: Setup,
                                                                                         tmp_path: Path) -> None:
    """Task 0 of a 2-task array is running (its lock names a live process): task 1 of the same
    split works beside it; a single-process job on the same output (its shards would overlap
    task 0's) is refused before any work, exit 2, naming the holder."""
    from dataclasses import asdict

    from train.runtime import run_lock

    out = tmp_path / "out"
    out.mkdir()
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        holder = run_lock.Holder(host=socket.gethostname(), pid=sleeper.pid, pid_start=run_lock._pid_start(sleeper.pid),
                                 job="slurm:500", slurm_job="500", slurm_restart=0, stage="recaption",
                                 started="2026-12-07 09:00:00 UTC", token="t")
        planted = out / run_lock.slot_name(0, 2)
        planted.write_text(json.dumps(asdict(holder)))
        setup.run(out, env={"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "SLURM_JOB_ID": "501"})
        assert len(list(out.glob(f"*{rc.STATS_SUFFIX}"))) == 4  # task 1's shards: 1, 3, 5, 7
        stderr = setup.run(out, code=2)
        assert stderr.strip().splitlines() == [
            f"recap recaption: error: recaption.output: directory {out} is in use by recap recaption (host "
            f"{holder.host}, pid {sleeper.pid}, Slurm job 500, started 2026-12-07 09:00:00 UTC): wait for it to end, "
            f"or use another directory; if that job is gone, delete {planted}"]
        assert len(list(out.glob(f"*{rc.STATS_SUFFIX}"))) == 4 and not list(out.glob(".*.partial"))
    finally:
        sleeper.kill()
        sleeper.wait()
