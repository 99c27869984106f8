"""`recap launch STAGE launcher=slurm`: the sbatch script (launch/slurm.py), its submission with
sbatch, one job per sweep point, and the script itself, run by bash against fake srun and
scontrol on this machine (two "nodes" on 127.0.0.1 training a tiny stage)."""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launch.slurm import (
    DERIVED_PORT,
    JOB_ID,
    NNODES,
    NODE_RANK,
    RDZV_ENDPOINT,
    SbatchJob,
    SubmitError,
    parse_job_id,
    render_sbatch,
    time_limit_seconds,
)
from tests.helpers import REPO, run_recap
from train.commands.exit_codes import EXIT_USAGE
from train.cli import main

NODE_ARGS = (f"launcher.nnodes={NNODES}", f"launcher.node_rank={NODE_RANK}", f"launcher.rdzv_endpoint={RDZV_ENDPOINT}",
             f"launcher.rdzv_id=slurm-{JOB_ID}")


def _job(**changes) -> SbatchJob:
    values = dict(job_name="recap-train-vae-toy", command=("/venv/bin/python", "-m", "train.cli", "train-vae"),
                  args=("seed=1", "launcher=torchrun", "launcher.nproc_per_node=8"), node_args=NODE_ARGS,
                  workdir="/work", run_dir="/work/runs/toy/train_vae", log_dir="/work/runs/toy/train_vae/slurm",
                  nodes=4, gpus_per_node=8, cpus_per_task=64, time="2-00:00:00")
    return SbatchJob(**{**values, **changes})


def _sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


# ---- the script's text ---------------------------------------------------------------------


def test_sbatch_lines_hold_the_allocation_requeue_signal_and_logs():
    text = render_sbatch(_job(partition="gpu", account="proj42", qos="high", signal_lead_s=120,
                              sbatch_args=("--exclusive", "--mem=0")))
    assert _sbatch_lines(text) == [
        "#SBATCH --job-name=recap-train-vae-toy",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --cpus-per-task=64",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@120",
        "#SBATCH --open-mode=append",
        "#SBATCH --output=/work/runs/toy/train_vae/slurm/%j.out",
        "#SBATCH --error=/work/runs/toy/train_vae/slurm/%j.err",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
    ]
    assert text.startswith("#!/bin/bash\n")
    # sbatch reads #SBATCH lines only up to the first command
    first_command = text.splitlines().index("set -eo pipefail")
    assert all(i < first_command for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))


def test_unset_partition_account_qos_and_zero_gpus_are_left_out():
    lines = _sbatch_lines(render_sbatch(_job(gpus_per_node=0)))
    assert not [line for line in lines if line.split("=")[0] in
                ("#SBATCH --partition", "#SBATCH --account", "#SBATCH --qos", "#SBATCH --gpus-per-node")]
    assert "#SBATCH --signal=USR1@90" in lines  # the default lead


def test_setup_runs_in_the_workdir_before_the_exports_and_the_port_is_derived_or_fixed():
    text = render_sbatch(_job(setup=("module load cuda/12.4", "source .venv/bin/activate"),
                              env=(("NCCL_DEBUG", "WARN"), ("ODD", "a b$c'd")), omp_num_threads=8))
    lines = text.splitlines()
    start = lines.index("set -eo pipefail")
    assert lines[start:start + 8] == [
        "set -eo pipefail",
        "cd /work",
        "module load cuda/12.4",
        "source .venv/bin/activate",
        "set -u  # after the setup lines: module and venv scripts often read unset variables",
        "export OMP_NUM_THREADS=8",
        "export NCCL_DEBUG=WARN",
        "export ODD='a b$c'\"'\"'d'",
    ]
    assert f"RDZV_PORT={DERIVED_PORT}" in lines
    assert "RDZV_PORT=29411" in render_sbatch(_job(rdzv_port=29411)).splitlines()
    # an OMP_NUM_THREADS of the user's own wins over the computed one
    own = render_sbatch(_job(env=(("OMP_NUM_THREADS", "2"),), omp_num_threads=8)).splitlines()
    assert [line for line in own if "OMP_NUM_THREADS" in line] == ["export OMP_NUM_THREADS=2"]


def test_srun_line_and_requeue_on_exit_75():
    lines = render_sbatch(_job()).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("srun "))
    assert lines[start:] == [
        "srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=1 --cpus-per-task=64 \\",
        "    bash -c 'exec \"$@\" \"launcher.nnodes=$SLURM_NNODES\" \"launcher.node_rank=$SLURM_NODEID\" "
        "\"launcher.rdzv_endpoint=$HEAD_NODE:$RDZV_PORT\" \"launcher.rdzv_id=slurm-$SLURM_JOB_ID\"' recap \\",
        "    /venv/bin/python -m train.cli train-vae \\",
        "    seed=1 \\",
        "    launcher=torchrun \\",
        "    launcher.nproc_per_node=8 \\",
        "    && code=0 || code=$?",
        'if [ "$code" -eq 75 ]; then',
        "    # Preempted or at the time limit, after a checkpoint on every rank: run again, same job id.",
        '    echo "recap: stage checkpointed and exited for a restart; requeueing job $SLURM_JOB_ID" >&2',
        '    scontrol requeue "$SLURM_JOB_ID" || echo "recap: scontrol requeue failed; resubmit the same recap '
        'launch command to resume" >&2',
        "fi",
        'exit "$code"',
    ]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("job_name", "my job", "the job name 'my job' has ' ', which an #SBATCH line cannot carry"),
    ("log_dir", "/runs/50%/slurm", "the log directory '/runs/50%/slurm' has '%'"),
    ("log_dir", "/runs/it's/slurm", "the log directory '/runs/it's/slurm' has \"'\""),
    ("partition", "gpu a100", "the partition 'gpu a100' has ' '"),
])
def test_names_an_sbatch_line_cannot_carry_are_refused(field, value, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        render_sbatch(_job(**{field: value}))


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90 * 60), ("90:30", 90 * 60 + 30), ("24:00:00", 86400), ("1:02:03", 3723), ("2-00", 2 * 86400),
    ("2-12", 2 * 86400 + 12 * 3600), ("1-02:30", 86400 + 2 * 3600 + 30 * 60), ("0-00:10:05", 605),
])
def test_time_limit_seconds(text, seconds):
    assert time_limit_seconds(text) == seconds


@pytest.mark.parametrize("text", ["", "1h", "-5", "1-2-3", "1:2:3:4", "24:00:", "UNLIMITED"])
def test_bad_time_limits_name_the_formats(text):
    with pytest.raises(ValueError, match=f"^'{text}' is not a Slurm time limit; use M, M:S, H:M:S, D-H, D-H:M or "
                                         "D-H:M:S$"):
        time_limit_seconds(text)


def test_parse_job_id():
    assert parse_job_id("Submitted batch job 4242\n") == 4242
    assert parse_job_id("sbatch: note: x\nSubmitted batch job 17 on cluster c\n") == 17
    with pytest.raises(SubmitError, match="sbatch printed no job id"):
        parse_job_id("sbatch: error: Batch job submission failed\n")


# ---- fake Slurm commands -------------------------------------------------------------------

SRUN = r"""#!/bin/bash
# Fake srun: the command once per node (--nodes=N), in the background, with Slurm's per-task
# variables; the exit code is the highest of the tasks', as srun's.
nodes=1
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
pids=()
for ((i = 0; i < nodes; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 SLURM_NNODES=$nodes "$@" &
  pids+=($!)
done
worst=0
for pid in "${pids[@]}"; do
  wait "$pid"; code=$?
  if (( code > worst )); then worst=$code; fi
done
exit $worst
"""
SCONTROL = r"""#!/bin/bash
if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\n' $FAKE_HOSTS; exit 0; fi
echo "$*" >> "$SHIM_LOG/scontrol.calls"
"""
SBATCH = r"""#!/bin/bash
(IFS=$'\t'; echo "$*") >> "$SHIM_LOG/sbatch.calls"
job=$(cat "$SHIM_LOG/next_job" 2>/dev/null || echo 4242)
echo $((job + 1)) > "$SHIM_LOG/next_job"
echo "Submitted batch job $job"
"""
# A stand-in interpreter: records what each node ran (argv, cwd, environment), exits $FAKE_EXIT.
FAKE_PYTHON = f"""#!{sys.executable}
import json, os, sys
keep = ("OMP_NUM_THREADS", "NCCL_DEBUG", "SLURM_NODEID")
record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keep}}}}
with open(os.path.join(os.environ["SHIM_LOG"], "node" + os.environ["SLURM_NODEID"] + ".json"), "w") as f:
    json.dump(record, f)
sys.exit(int(os.environ.get("FAKE_EXIT", "0")))
"""


@pytest.fixture
def slurm(tmp_path: Path) -> dict[str, str]:
    """Environment of a batch job with fake srun, scontrol and sbatch first on PATH (their records
    in $SHIM_LOG); the stand-in interpreter is <tmp_path>/fake_python."""
    bin_dir, log = tmp_path / "fake_slurm", tmp_path / "fake_log"
    bin_dir.mkdir()
    log.mkdir()
    for path, text in ((bin_dir / "srun", SRUN), (bin_dir / "scontrol", SCONTROL), (bin_dir / "sbatch", SBATCH),
                       (tmp_path / "fake_python", FAKE_PYTHON)):
        path.write_text(text)
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SHIM_LOG": str(log), "FAKE_HOSTS": "node-a node-b",
            "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_NNODES": "2"}


def _run_script(text: str, env: dict[str, str], tmp_path: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    return subprocess.run(["bash", str(script)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


def _calls(env: dict[str, str], name: str) -> list[list[str]]:
    path = Path(env["SHIM_LOG"]) / f"{name}.calls"
    return [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []


# ---- the script, executed --------------------------------------------------------------------

TRICKY = ("a b", "$HOME", "it's", 'say "hi"', "{0..3}", "*", "back\\slash", "x=${oc.env:HOME}")


def test_script_hands_every_argument_over_exactly_and_each_node_its_rank(slurm, tmp_path):
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    job = _job(command=(str(tmp_path / "fake_python"), "-m", "train.cli", "train-vae"), args=TRICKY, nodes=2,
               workdir=str(workdir), env=(("NCCL_DEBUG", "INFO"),), omp_num_threads=4)
    proc = _run_script(render_sbatch(job), slurm, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["recap: job 4242 (restart 0) on 2 node(s), rendezvous node-a:24242"]
    for node in (0, 1):
        record = json.loads((Path(slurm["SHIM_LOG"]) / f"node{node}.json").read_text())
        assert record["argv"] == ["-m", "train.cli", "train-vae", *TRICKY, "launcher.nnodes=2",
                                  f"launcher.node_rank={node}", "launcher.rdzv_endpoint=node-a:24242",
                                  "launcher.rdzv_id=slurm-4242"]
        assert record["cwd"] == str(workdir)
        assert record["env"] == {"OMP_NUM_THREADS": "4", "NCCL_DEBUG": "INFO", "SLURM_NODEID": str(node)}
    assert _calls(slurm, "scontrol") == []  # no requeue after success


@pytest.mark.parametrize(("code", "requeued"), [(75, True), (3, False), (1, False)])
def test_script_requeues_the_job_when_the_stage_exits_75(slurm, tmp_path, code, requeued):
    job = _job(command=(str(tmp_path / "fake_python"),), args=(), nodes=2, workdir=str(tmp_path))
    proc = _run_script(render_sbatch(job), {**slurm, "FAKE_EXIT": str(code)}, tmp_path)
    assert proc.returncode == code  # the stage's own code: 75 stays 75 (the job is requeued, not failed silently)
    assert _calls(slurm, "scontrol") == ([["requeue 4242"]] if requeued else [])
    assert ("requeueing job 4242" in proc.stderr) is requeued


# ---- recap launch --------------------------------------------------------------------------


def _launch_args(root: Path, *extra: str) -> list[str]:
    return ["launch", "train-vae", "launcher=slurm", f"run.root={root}", "launcher.slurm.partition=gpu", *extra]


def test_dry_run_prints_the_script_and_submits_nothing(slurm, tmp_path):
    root = tmp_path / "runs"
    proc = run_recap([*_launch_args(root, "seed=3", "launcher.nnodes=2", "runtime=ddp",
                                    "train_vae.global_batch_size=16", "train_vae.micro_batch_size=8",
                                    "launcher.slurm.cpus_per_task=16"), "--dry-run"],
                     env=slurm)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    log_dir = root / "toy" / "train_vae" / "slurm"
    assert f"#SBATCH --output={log_dir}/%j.out" in lines
    assert "#SBATCH --nodes=2" in lines and "#SBATCH --partition=gpu" in lines
    assert "#SBATCH --cpus-per-task=16" in lines and "export OMP_NUM_THREADS=16" in lines
    assert f"cd {shlex.quote(str(REPO))}" in lines  # where `recap launch` ran: relative paths resolve alike
    srun = lines.index(next(line for line in lines if line.startswith("srun ")))
    # The user's overrides minus the launcher ones, then torchrun's for every node.
    assert [line.strip(" \\") for line in lines[srun + 2:srun + 13]] == [
        f"{sys.executable} -m train.cli train-vae", f"run.root={root}", "seed=3", "runtime=ddp",
        "train_vae.global_batch_size=16", "train_vae.micro_batch_size=8", "launcher=torchrun",
        "launcher.nproc_per_node=1", "launcher.rdzv_timeout_s=300", "launcher.shutdown_timeout_s=120",
        "&& code=0 || code=$?",
    ]
    assert not root.exists()  # nothing written
    assert _calls(slurm, "sbatch") == []


def test_submit_writes_the_script_into_the_run_dir_and_resubmitting_renders_it_again(slurm, tmp_path):
    root = tmp_path / "runs"
    script = root / "toy" / "train_vae" / "slurm" / "train-vae.sbatch"
    first = run_recap(_launch_args(root, "seed=3"), env=slurm)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == [f"submitted batch job 4242: script {script}, log {script.parent}/4242.out"]
    text = script.read_text()
    dry = run_recap([*_launch_args(root, "seed=3"), "--dry-run"], env=slurm)
    assert dry.stdout == text  # --dry-run shows exactly what is submitted
    again = run_recap(_launch_args(root, "seed=3"), env=slurm)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [f"submitted batch job 4243: script {script}, log {script.parent}/4243.out"]
    assert script.read_text() == text  # same command, same run directory, same script: the job resumes
    assert _calls(slurm, "sbatch") == [[str(script)], [str(script)]]
    assert sorted(p.name for p in script.parent.iterdir()) == ["train-vae.sbatch"]


@pytest.mark.slow
def test_multirun_submits_one_job_per_point_in_its_own_run_dir(slurm, tmp_path):
    root = tmp_path / "runs"
    proc = run_recap(["launch", "make-toy-data", "-m", "seed=1,2", "launcher=slurm", f"run.root={root}"], env=slurm)
    assert proc.returncode == 0, proc.stderr
    sweep = root / "toy" / "sweeps" / "make_toy_data"
    scripts = [sweep / point / "slurm" / "make-toy-data.sbatch" for point in ("0", "1")]
    assert _calls(slurm, "sbatch") == [[str(scripts[0])], [str(scripts[1])]]
    assert [line for line in proc.stdout.splitlines() if line.startswith("submitted")] == [
        f"submitted batch job {job}: script {path}, log {path.parent}/{job}.out"
        for job, path in zip((4242, 4243), scripts)
    ]
    for point, (path, seed) in enumerate(zip(scripts, ("1", "2"))):
        args = [word for line in path.read_text().splitlines() if line.startswith("    ") and line.endswith(" \\")
                for word in shlex.split(line.removesuffix(" \\"))]
        assert f"seed={seed}" in args and f"hydra.run.dir='{sweep / str(point)}'" in args
        assert f"#SBATCH --output={sweep / str(point)}/slurm/%j.out" in path.read_text().splitlines()


def test_recap_stage_with_launcher_slurm_points_to_recap_launch(capsys):
    assert main(["train-vae", "launcher=slurm"]) == EXIT_USAGE
    assert capsys.readouterr().err == (
        "recap train-vae: error: launcher: launcher=slurm submits a batch job: run `recap launch train-vae` with the "
        "same arguments (add --dry-run to see the sbatch script first)\n")


@pytest.mark.parametrize(("extra", "message"), [
    (["launcher.slurm.time=1h"], "launcher.slurm.time: '1h' is not a Slurm time limit; use M, M:S, H:M:S, D-H, "
                                 "D-H:M or D-H:M:S"),
    (["launcher.slurm.time=1", "launcher.slurm.signal_lead_s=90"],
     "launcher.slurm.signal_lead_s: must be > 0 and below the time limit (60 s), got 90"),
    (["+launcher.slurm.env.HF_TOKEN=abc"],
     "launcher.slurm.env.HF_TOKEN: looks like a credential, which the sbatch script would store in plain text; "
     "export HF_TOKEN before `recap launch` instead (sbatch passes it on)"),
    (["data.train=https://user:hunter22@example.com/x.tar"],
     "data.train: holds a secret, which the sbatch script would store in plain text; read it from the environment "
     "instead: key='...${oc.env:VAR}...' with VAR exported before recap launch (sbatch passes your environment on)"),
    (["launcher.slurm.sbatch_args=[exclusive]"],
     "launcher.slurm.sbatch_args: 'exclusive' is not an sbatch option; write them as --name=value"),
    (["--cfg", "job"], "recap launch takes -m and --dry-run, not --cfg; `recap train-vae --cfg job` prints the config"),
    (["run.name=\"it's\""],
     "the job name 'recap-train-vae-it's' has \"'\", which an #SBATCH line cannot carry; choose a name without "
     "blanks, quotes, % or backslashes (the job name comes from launcher.slurm.job_name or run.name, the log "
     "directory from run.root and run.name, the others from launcher.slurm)"),
])
def test_launch_mistakes_exit_2_with_one_line(extra, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(_launch_args(tmp_path / "runs", *extra)) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err == f"recap launch train-vae: error: {message}\n".replace("hunter22", "***")
    assert captured.out == "" and list(tmp_path.iterdir()) == []


def test_interpolated_secrets_are_accepted(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHARD_PW", "hunter22")
    url = "data.train='https://user:${oc.env:SHARD_PW}@example.com/x.tar'"
    assert main([*_launch_args(tmp_path / "runs", url), "--dry-run"]) == 0
    assert f"    {shlex.quote(url)} \\" in capsys.readouterr().out.splitlines()


def test_sbatch_missing_or_failing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no sbatch anywhere
    assert main(_launch_args(tmp_path / "runs")) == EXIT_USAGE
    assert capsys.readouterr().err == ("recap launch train-vae: error: 'sbatch' is not on PATH: run recap launch on a "
                                       "Slurm login node, or add --dry-run to print the script\n")
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'sbatch: error: invalid partition specified: gpu' >&2\nexit 1\n")
    (bin_dir / "sbatch").chmod(0o755)
    assert main(_launch_args(tmp_path / "runs")) == 1
    assert capsys.readouterr().err == ("recap launch train-vae: error: sbatch exited with code 1: sbatch: error: "
                                       "invalid partition specified: gpu\n")


# ---- the real thing: a tiny stage on two fake nodes ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_rendered_script_trains_on_two_nodes(slurm, tmp_path, toy_data):
    """`recap launch --dry-run`'s script, run by bash: srun starts `recap train-vae` on two "nodes"
    (127.0.0.1), each runs torchrun with one process, and they meet at the rendezvous."""
    root = tmp_path / "runs"
    args = ["launch", "train-vae", "launcher=slurm", f"run.root={root}", f"data.train={toy_data}/train",
            f"data.heldout={toy_data}/heldout", "train_vae.steps=2", "checkpoint.every_steps=2",
            "train_vae.resolution=32",
            "train_vae.global_batch_size=4", "train_vae.micro_batch_size=2", "vae.block_out_channels=[8,16,16,16]",
            "vae.norm_num_groups=8", "data.reader.num_workers=0", "logger.wandb.mode=disabled", "logger.progress=false",
            "runtime=ddp", "launcher.nnodes=2", "launcher.slurm.cpus_per_task=2", "launcher.slurm.gpus_per_node=0",
            f"launcher.slurm.rdzv_port={_free_port()}", "launcher.rdzv_timeout_s=60", "--dry-run"]
    rendered = run_recap(args, env=slurm)
    assert rendered.returncode == 0, rendered.stderr
    proc = _run_script(rendered.stdout, {**slurm, "FAKE_HOSTS": "127.0.0.1 127.0.0.2"}, tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = root / "toy" / "train_vae"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["processes"], summary["steps"], summary["samples_seen"]) == (2, 2, 8)
    assert (run_dir / "checkpoints" / "step_000000002" / "COMMITTED").is_file()
    launcher = yaml.safe_load((run_dir / "config.yaml").read_text())["launcher"]
    assert (launcher["kind"], launcher["nnodes"], launcher["rdzv_id"]) == ("torchrun", 2, "slurm-4242")
    assert _calls(slurm, "scontrol") == []
