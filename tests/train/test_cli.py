"""The `recap` console script: help, one-line usage errors (exit 2), multirun, and the
override pre-checks behind them (train/config/loading.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from train.commands.exit_codes import EXIT_USAGE
from train.commands.stage_table import STAGES
from train.cli import main
from train.config.loading import GROUP_PACKAGES, check_overrides, config_groups, load_experiment, sweep_keys
from train.config.typed import ConfigError

RECAP = Path(sys.executable).with_name("recap")
TOP_KEYS = ("cache, caption, caption_mix, captioner, checkpoint, data, diffusion, evaluate, evaluate_captioner, "
            "finetune_captioner, launcher, logger, pipeline, pretrain_captioner, recaption, resume, run, runtime, "
            "sample, seed, sweep_report, text_encoder, train_eval_clip, train_t2i, train_tokenizer, train_vae, unet, vae")


def _recap(*args: str, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    cmd = [str(RECAP)] if RECAP.exists() else [sys.executable, "-m", "train.cli"]
    return subprocess.run([*cmd, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """An empty current directory: nothing may be written into it (run.root points elsewhere)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def test_console_script_is_installed():
    assert RECAP.exists(), f"{RECAP} missing: the recap console script is not installed in this environment"


def test_top_level_help_lists_every_stage(workdir):
    proc = _recap("--help", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert lines[0] == "usage: recap STAGE [key=value ...] [group=option ...] [-m]"
    for name, stage in STAGES.items():
        assert any(line.split()[:1] == [name] and line.rstrip().endswith(stage.summary) for line in lines), name
    exit_codes = lines.index("Exit codes: 0 ok, 1 crash, 2 usage or config error, 3 bad data, unusable or unsaved "
                             "checkpoint, 4 training diverged,")
    assert lines[exit_codes + 1].split() == "75 preempted after a checkpoint (SIGTERM/SIGUSR1; rerun the same command "\
        "to resume).".split()
    assert list(workdir.iterdir()) == []


def test_no_arguments_prints_help_and_is_a_usage_error(capsys):
    assert main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and all(name in captured.err for name in STAGES)


def test_stage_help_lists_groups_and_options(workdir):
    proc = _recap("train-vae", "--help", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert out[0] == "usage: recap train-vae [key=value ...] [group=option ...] [-m] [--cfg job]"
    assert STAGES["train-vae"].summary in out
    for group, options in config_groups().items():
        shown = f"{group}@<stage>.{group}" if group in GROUP_PACKAGES else group
        rows = [line.split(None, 1) for line in out if line.startswith("  ") and line.split()[:1] == [shown]]
        assert rows == [[shown, ", ".join(options)]], group
    assert "optimizer@<stage>.optimizer adamw" in " ".join(" ".join(out).split())


# (argv, stage in the message, expected text after "recap STAGE: error: "; a str is the whole
# message, a tuple lists fragments that must all appear)
ERRORS = [
    pytest.param(["trian-vae"], "trian-vae",
                 "unknown stage 'trian-vae' (did you mean 'train-vae'?); stages: make-toy-data, pretrain-captioner, finetune-captioner, caption, evaluate-captioner, recaption, train-tokenizer, train-vae, cache, train-t2i, sample, train-eval-clip, evaluate, sweep-report, pipeline",
                 id="unknown-stage"),
    pytest.param(["train-vae", "data.tarin=x"], "train-vae",
                 "data.tarin: unknown config key (did you mean 'train'?); valid keys under 'data': "
                 "heldout, reader, toy, train", id="unknown-key"),
    pytest.param(["train-vae", "dtaa.train=x"], "train-vae",
                 f"dtaa.train: unknown config key (did you mean 'data'?); valid keys: {TOP_KEYS}",
                 id="unknown-top-level-key"),
    pytest.param(["train-vae", "runtime=zero5"], "train-vae",
                 "runtime: 'zero5' is not an option of group 'runtime' (did you mean 'zero3'?); "
                 "options: ddp, single, zero1, zero2, zero3", id="unknown-group-option"),
    pytest.param(["train-vae", "train_vae.steps=abc"], "train-vae",
                 "train_vae.steps: expected an integer, got 'abc'", id="wrong-type"),
    pytest.param(["make-toy-data", "data.reader.num_workers=-1"], "make-toy-data",
                 "data.reader: num_workers must be >= 0, got -1", id="out-of-range"),
    pytest.param(["train-vae", "train_vae.global_batch_size=33", "train_vae.micro_batch_size=8"], "train-vae",
                 "train_vae.global_batch_size: 33 is not divisible by world_size (1) x micro_batch_size (8) = 8; "
                 "set global_batch_size to a multiple of 8 or change micro_batch_size", id="inconsistent-batch"),
    pytest.param(["train-vae", "-m", "data.reader.num_workers=1,x"], "train-vae",
                 "data.reader.num_workers: expected an integer, got 'x'", id="bad-sweep-value"),
    pytest.param(["train-vae", "--foo"], "train-vae",
                 "unknown option '--foo'; options: -m/--multirun, --cfg job|hydra|all, --resolve", id="unknown-flag"),
    pytest.param(["train-vae", "--cfg", "bogus"], "train-vae", "--cfg needs a value: job, hydra or all",
                 id="bad-cfg-value"),
    pytest.param(["train-vae", "optimizer=adamw"], "train-vae",
                 ("optimizer: ", "use optimizer@<stage>.optimizer=<option>", "options: adamw"),
                 id="optimizer-without-package"),
    pytest.param(["train-vae", "=x"], "train-vae", "cannot parse override '=x': the key is missing; use key=value",
                 id="malformed-missing-key"),
    pytest.param(["train-vae", "a=="], "train-vae",
                 ("cannot parse override 'a==': extraneous input '='", "; use key=value"), id="malformed-double-equals"),
    pytest.param(["train-vae", "runtime=single", "launcher=torchrun", "launcher.nproc_per_node=2"], "train-vae",
                 "runtime: runtime=single runs one process but the launcher starts 2 (launcher.nproc_per_node x "
                 "launcher.nnodes); use runtime=ddp or zero1/2/3, or launcher=local", id="single-runtime-torchrun"),
    pytest.param(["make-toy-data", "seed=1,2"], "make-toy-data",
                 ("seed: has several values (a sweep): add -m to run one job per value",), id="sweep-without-m"),
]


@pytest.mark.parametrize(("argv", "stage", "expected"), ERRORS)
def test_usage_errors_exit_2_with_one_line(argv, stage, expected, workdir, tmp_path):
    proc = _recap(*argv, f"run.root={tmp_path / 'runs'}", cwd=workdir)
    assert proc.returncode == EXIT_USAGE, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""  # nothing started: no Hydra launch lines, no torchrun banner
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"recap {stage}: error: "
    assert lines[0].startswith(prefix)
    message = lines[0].removeprefix(prefix)
    if isinstance(expected, str):
        assert message == expected
    else:
        assert all(fragment in message for fragment in expected), message
    assert list(workdir.iterdir()) == [] and not (tmp_path / "runs").exists()


# ---- the pre-checks in-process (no subprocess) ---------------------------------------------


def _check_error(overrides: list[str]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        check_overrides(overrides)
    return info.value


@pytest.mark.parametrize(
    ("overrides", "key", "message"),
    [
        (["bogus=1"], "bogus", f"unknown config key; valid keys: {TOP_KEYS}"),
        (["optimzer=adamw"], "optimzer", f"unknown config key (did you mean 'optimizer'?); valid keys: {TOP_KEYS}"),
        (["run.name.x=1"], "run.name.x", "'run.name' is a value, not a section; set it directly with run.name=..."),
        (["~data"], "data", "a config group cannot be removed; choose one of its options instead"),
        (["seed=null"], "seed", "must not be null; expected int"),
        (["seed=interval(0,1)"], "seed", "only list and range sweeps can be checked (a,b,c or range(...))"),
        (["experiment=toyy"], "experiment",
         "'toyy' is not an option of group 'experiment' (did you mean 'toy'?); options: dalle3_1024, dalle3_256, toy"),
        (["data=null"], "data", "'null' is not an option of group 'data'; options: img2dataset, toy"),
        (["runtime=single,zero9"], "runtime",
         "'zero9' is not an option of group 'runtime' (did you mean 'zero3'?); "
         "options: ddp, single, zero1, zero2, zero3"),
        (["train_vae.optimizer.lr=0"], "train_vae.optimizer.lr", "must be > 0, got 0.0"),
        (["run.name=../../etc"], "run.name", "must be one folder name under run.root (no '/', not '.' or '..'), got "
                                             "'../../etc'"),
        (["run.name="], "run.name", "must be one folder name under run.root (no '/', not '.' or '..'), got ''"),
        (["run.name=.."], "run.name", "must be one folder name under run.root (no '/', not '.' or '..'), got '..'"),
        (["+data.reader.extra=1"], "data.reader.extra",
         "unknown key; valid keys here: fault_check_after, max_fault_fraction, max_image_pixels, num_workers, open_shards, "
         "prefetch_factor, shuffle, strict"),
        (["x"], "", "cannot parse override 'x': missing EQUAL at '<EOF>'; use key=value, and quote values with "
                    "braces, commas or colons (data.train='/data/{00000..00099}.tar')"),
    ],
)
def test_check_overrides_messages(overrides, key, message):
    err = _check_error(overrides)
    assert (err.key, err.message) == (key, message)


def test_optimizer_in_the_wrong_package_is_explained():
    err = _check_error(["optimizer@foo=adamw"])
    assert err.key == "optimizer"
    assert err.message.startswith("'optimizer@foo' is not a place for it; ")
    assert "use optimizer@<stage>.optimizer=<option>" in err.message


def test_every_sweep_point_is_checked():
    err = _check_error(["train_vae.micro_batch_size=16,8", "train_vae.global_batch_size=16,24"])
    assert err.key == "train_vae.global_batch_size"
    assert err.message.startswith("24 is not divisible by world_size (1) x micro_batch_size (16) = 16")


def test_single_values_keep_their_type_and_quoting():
    cfg = load_experiment(["vae.scaling_factor=null", "text_encoder.tokenizer=null", "data.train='a,b'",
                           "optimizer@train_vae.optimizer=adamw", "train_vae.optimizer.betas=[0.8,0.9]"])
    assert cfg.vae.scaling_factor is None
    assert cfg.text_encoder.tokenizer is None  # not the string 'None'
    assert cfg.data.train == "a,b"  # a quoted value, not a sweep
    assert cfg.train_vae.optimizer.betas == (0.8, 0.9)


def test_first_sweep_point_is_returned():
    cfg = load_experiment(["seed=range(3,6)", "data.reader.num_workers=4,0"])
    assert (cfg.seed, cfg.data.reader.num_workers) == (3, 4)


def test_sweep_keys():
    assert sweep_keys(["seed=1,2", "a=1", "b=range(2)", "c='x,y'", "hydra.job.name=q", "d=[1,2]"]) == ["seed", "b"]
    assert sweep_keys([]) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train-vae", "--cfg"], "recap train-vae: error: --cfg needs a value: job, hydra or all"),
        (["train-vae", "-c", "seed=1"], "recap train-vae: error: -c needs a value: job, hydra or all"),
        (["tarin-vae"], "recap tarin-vae: error: unknown stage 'tarin-vae' (did you mean 'train-vae'?); "
                        "stages: make-toy-data, pretrain-captioner, finetune-captioner, caption, evaluate-captioner, recaption, train-tokenizer, train-vae, cache, train-t2i, sample, train-eval-clip, evaluate, sweep-report, pipeline"),
    ],
)
def test_main_in_process_usage_errors(argv, message, capsys):
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == message + "\n"
    assert captured.out == ""


# ---- multirun -----------------------------------------------------------------------------


@pytest.mark.slow
def test_multirun_makes_one_run_directory_per_point(workdir, tmp_path):
    root = tmp_path / "runs"
    proc = _recap(
        "make-toy-data", "-m", "seed=1,2", f"run.root={root}", "data.toy.train_shards=2", "data.toy.heldout_shards=1",
        "data.toy.samples_per_shard=4", "data.toy.processes=1", "logger.progress=false", cwd=workdir,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    sweep = root / "toy" / "sweeps" / "make_toy_data"
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    seeds, summaries = [], []
    for point in ("0", "1"):
        run_dir = sweep / point
        assert (run_dir / "logs" / "make_toy_data.rank0.log").is_file()
        seeds.append(yaml.safe_load((run_dir / "config.yaml").read_text())["seed"])
        summaries.append(yaml.safe_load((run_dir / "summary.json").read_text()))
    assert seeds == [1, 2]
    # Both points share the toy data directory: the first writes it, the second finds it complete.
    assert [(s["shards_written"], s["shards_skipped"]) for s in summaries] == [(3, 0), (0, 3)]
    assert summaries[0]["train_dir"] == str(root / "toy" / "toy_data" / "train")
    assert sorted(p.name for p in (root / "toy" / "toy_data" / "train").glob("*.tar")) == ["00000.tar", "00001.tar"]
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert "seed=1,2" in multirun["hydra"]["overrides"]["task"]
    assert multirun["hydra"]["job"]["name"] == "make_toy_data"
    assert list(workdir.iterdir()) == []


@pytest.mark.slow
def test_multirun_yaml_and_errors_are_redacted(workdir, tmp_path):
    root = tmp_path / "runs"
    secret_url = "https://user:hunter2pass@example.com/x.tar"
    proc = _recap("make-toy-data", "-m", "seed=1", f"run.root={root}", f"data.heldout={secret_url}",
                  "logger.progress=false", cwd=workdir)
    # make-toy-data refuses a URL as its output directory: a config error raised inside the job.
    assert proc.returncode == EXIT_USAGE, proc.stderr
    # The point runs in its own process and reports its error; the sweep then summarises.
    assert proc.stderr.splitlines() == [
        "recap make-toy-data: error: data.heldout: make-toy-data writes into a local directory, "
        "got 'https://user:***@example.com/x.tar'",
        "recap make-toy-data: error: 1 sweep point(s) failed: #0 (exit 2); see their messages above",
    ]
    assert "hunter2pass" not in proc.stdout  # Hydra's "#0 : <overrides>" launch line is redacted too
    sweep = root / "toy" / "sweeps" / "make_toy_data"
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "multirun.yaml"]  # rewritten in place, no temp left
    text = (sweep / "multirun.yaml").read_text()
    assert "hunter2pass" not in text
    assert "data.heldout=https://user:***@example.com/x.tar" in yaml.safe_load(text)["hydra"]["overrides"]["task"]
    assert yaml.safe_load((sweep / "0" / "config.yaml").read_text())["data"]["heldout"] == \
        "https://user:***@example.com/x.tar"
    for path in root.rglob("*"):
        assert "hunter2pass" not in str(path)
        if path.is_file():
            assert "hunter2pass" not in path.read_text(errors="replace"), path


# ---- recap launch (its launchers: tests/train/test_launch_slurm.py, test_launch_deepspeed.py) ----


def test_help_mentions_launch_and_launch_has_its_own_help(capsys):
    assert main(["--help"]) == 0
    assert ("`recap launch STAGE ... [--dry-run]` starts a stage with its launcher: torchrun, DeepSpeed, or a Slurm "
            "job.") in capsys.readouterr().out.splitlines()
    assert main(["launch", "--help"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "usage: recap launch STAGE [key=value ...] [group=option ...] [-m] [--dry-run]"
    assert [line.split()[0] for line in out if line.startswith("  ")] == ["local", "torchrun", "deepspeed", "slurm"]


def test_launch_unknown_stage_exits_2(capsys):
    assert main(["launch", "trian-vae", "--dry-run"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err.startswith("recap launch: error: unknown stage 'trian-vae' (did you mean 'train-vae'?); "
                                   "stages: make-toy-data, ")
    assert captured.out == ""


def test_launch_dry_run_with_launcher_local_prints_the_stage_command(capsys):
    assert main(["launch", "train-vae", "seed=2", "--dry-run", "train_vae.steps=5"]) == 0
    assert capsys.readouterr().out == f"{sys.executable} -m train.cli train-vae seed=2 train_vae.steps=5\n"


@pytest.mark.parametrize("root", ["/proc", "file"])
def test_a_run_root_that_cannot_hold_run_directories_is_a_usage_error(root, tmp_path, capsys):
    target = "/proc" if root == "/proc" else str(tmp_path / "a_file")
    if root == "file":
        Path(target).write_text("not a directory")
    assert main(["train-vae", f"run.root={target}", "--cfg", "job"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"recap train-vae: error: run.root: cannot write run directories under "
                                               f"'{target}': ")
    assert main(["train-vae", f"run.root={tmp_path / 'new' / 'runs'}", "--cfg", "job"]) == 0  # a new one is fine
    assert not (tmp_path / "new").exists()  # and checking it created nothing


def test_cfg_job_prints_the_config_with_url_passwords_masked(capsys):
    url = "https://alice:Sup3rS3cretPw@data.example.com/{00000..00003}.tar"
    assert main(["train-vae", f"data.heldout='{url}'", "--cfg", "job"]) == 0
    out = capsys.readouterr().out
    assert "  heldout: https://alice:***@data.example.com/{00000..00003}.tar" in out.splitlines()
    assert "Sup3rS3cretPw" not in out and "train_vae:" in out


AS_ROOT = os.geteuid() == 0
CHMOD_SKIP = "runs as root, which writes into read-only folders anyway; the /proc variant covers the check"


def _unwritable(path: Path, how: str) -> None:
    """``path`` made a folder that refuses new files: a link to /proc, or a read-only folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if how == "proc":
        path.symlink_to("/proc")
    else:
        path.mkdir()
        path.chmod(0o555)


@pytest.mark.parametrize("how", ["proc", pytest.param("chmod", marks=pytest.mark.skipif(AS_ROOT, reason=CHMOD_SKIP))])
def test_a_run_directory_that_cannot_be_made_is_a_usage_error(how, tmp_path, capsys):
    """run.root/run.name (or the stage's folder in it) refuses new files: Hydra's mkdir was a traceback."""
    _unwritable(tmp_path / "toy", how)
    assert main(["train-vae", f"run.root={tmp_path}", "--cfg", "job"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"recap train-vae: error: run.name: cannot write the run directory '{tmp_path}/toy/train_vae': "
        f"'{tmp_path}/toy' refuses new files: [Errno "), err
    assert err[0].endswith(". Make it writable, or choose another run.root or run.name")
    if how == "chmod":
        (tmp_path / "toy").chmod(0o755)
    else:
        (tmp_path / "toy").unlink()
    _unwritable(tmp_path / "toy" / "train_vae", how)  # the stage's folder itself
    assert main(["train-vae", f"run.root={tmp_path}", "--cfg", "job"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"recap train-vae: error: run.name: cannot write to the run directory '{tmp_path}/toy/train_vae': [Errno "), err


@pytest.mark.parametrize(("folder", "how"), [
    ("checkpoints", "proc"), ("pipeline/unet", "proc"),
    pytest.param("checkpoints", "chmod", marks=pytest.mark.skipif(AS_ROOT, reason=CHMOD_SKIP))])
def test_a_folder_of_the_run_directory_that_refuses_files_stops_the_stage_before_any_work(folder, how, tmp_path,
                                                                                            workdir):
    """A read-only checkpoints/ let training run and lost every step at the first save; any folder
    the stage writes or prunes in (here also one two levels down) is probed first."""
    run_dir = tmp_path / "runs" / "toy" / "train_vae"
    _unwritable(run_dir / folder, how)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    proc = _recap("train-vae", f"run.root={tmp_path / 'runs'}", "logger.wandb.mode=disabled", cwd=workdir)
    assert proc.returncode == EXIT_USAGE, proc.stderr[-3000:]
    reason = "[Errno 13] Permission denied" if how == "chmod" else "[Errno "
    assert proc.stderr.startswith(f"recap train-vae: error: cannot write to '{run_dir / folder}' in the run "
                                  f"directory: {reason}"), proc.stderr
    assert proc.stderr.endswith(". Make it writable, or choose another run.root or run.name\n")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # no logs, config.yaml, metrics
    if how == "chmod":
        (run_dir / folder).chmod(0o755)


# Each precheck refused here on its first check, so by then it imported all it needs.
_REFUSED_PRECHECKS = {
    "recaption": (["recaption.input=/nonexistent/shards"], "recaption.input"),
    "cache": (["cache.input=/nonexistent/shards"], "cache.input"),
    "train-t2i": (["train_t2i.cache=/nonexistent/cache"], "train_t2i.cache"),
}
_PRECHECK_SCRIPT = """
import json, sys
from train.commands.prechecks import PRECHECKS
from train.config.loading import load_experiment
from train.config.typed import ConfigError
stage, overrides = sys.argv[1], sys.argv[2:]
try:
    PRECHECKS[stage](load_experiment(overrides))
    refused = None
except ConfigError as exc:
    refused = exc.key
libraries = ("diffusers", "open_clip", "transformers", "deepspeed", "accelerate")
print(json.dumps({"refused": refused, "loaded": [m for m in libraries if m in sys.modules]}))
"""


def test_prechecks_are_the_stage_tables_and_import_no_model_library(tmp_path: Path) -> None:
    """The launching process runs a stage's precheck before torchrun starts the workers: it loads
    no model library (diffusers alone is ~3 s per launch on a CPU) and still refuses bad input."""
    import json

    from train.commands.prechecks import PRECHECKS

    assert set(PRECHECKS) == {name for name, stage in STAGES.items() if stage.precheck} == set(_REFUSED_PRECHECKS)
    for stage, (overrides, key) in _REFUSED_PRECHECKS.items():
        done = subprocess.run([sys.executable, "-c", _PRECHECK_SCRIPT, stage, f"run.root={tmp_path}", *overrides],
                              cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == {"refused": key, "loaded": []}, stage
