"""`recap pipeline`: every stage of the recipe in order, then a report.

Reads: pipeline (stages, force, report_examples), run and evaluate_captioner.input (the report's
caption examples); each stage reads its own sections.
Writes <run_dir>/stage_times.json and summary.json, and <experiment dir>/report.md (see
train/outputs/pipeline_report.py).

Each stage runs as its own `recap STAGE` process with the pipeline's command-line overrides
(plus the stage's own, e.g. ``style=ssc``), so it gets exactly what a hand-typed command gets:
its launcher (torchrun), its run directory, its resume. A stage whose outputs are complete (its
run directory has a summary, written last) is skipped; an interrupted stage has none, so a rerun
of the pipeline runs it again and the stage resumes from its own checkpoint. The first stage to
fail stops the pipeline with that stage's exit code, after the report is written.

Sweeps: `recap pipeline -m caption_mix.dsc=0.5,0.95` runs one pipeline per point. train-t2i,
sample and evaluate (PER_POINT: what the caption mix changes) run per point, in the point's own
directory (runs/<exp>/sweeps/pipeline/<N>/<stage>), sample and evaluate pointed at that point's
trained pipeline. The other stages do not depend on the caption mix: they run once in the
experiment directory (the first point runs them, the others find them complete). `recap sweep-report` reads
the points' evaluations.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_pipeline.shard_io import write_json_atomic
from train.config.experiment import ExperimentConfig
from train.outputs.pipeline_report import write_report
from train.outputs.run_logging import finish_stage, setup_logging, write_config_snapshot
from train.config.typed import ConfigError

STAGE = "pipeline"
TRAINER = "train-t2i"
PER_POINT = (TRAINER, "sample", "evaluate")  # what a sweep point runs in its own directory: what the caption mix changes
_SUBDIR_KEYS = {"finetune-captioner": "style"}  # stages that write under <stage dir>/<value of this key>
_SAMPLER_SECTIONS = {"sample": "sample.sampler", "evaluate": "evaluate.sampler"}  # who samples from train-t2i's export
log = logging.getLogger("recap")


@dataclass(frozen=True)
class Step:
    """One stage of the pipeline: ``spec`` as configured ("finetune-captioner style=ssc"), the
    command-line arguments it adds, and the directory whose summary marks it complete."""

    spec: str
    stage: str
    args: tuple[str, ...]
    out_dir: Path

    @property
    def complete(self) -> bool:
        return any(self.out_dir.glob("summary*.json"))  # cache under torchrun: summary.rank<N>.json


def plan(stages: list[str], *, experiment_dir: Path, point_dir: Path | None = None) -> list[Step]:
    """The steps of ``stages`` (specs "STAGE [key=value ...]"); with ``point_dir`` (a sweep point),
    the PER_POINT steps write under it and sample/evaluate read its train-t2i export."""
    from train.commands.stage_table import STAGES

    steps = []
    for spec in stages:
        stage, *args = spec.split()
        if stage not in STAGES or stage == STAGE:
            raise ConfigError("pipeline.stages", f"'{stage}' is not a stage the pipeline can run; stages: "
                              f"{', '.join(s for s in STAGES if s != STAGE)}")
        per_point = point_dir is not None and stage in PER_POINT
        job = stage.replace("-", "_")
        out_dir = (point_dir if per_point else experiment_dir) / job
        if per_point:
            args.append(f"hydra.run.dir={out_dir}")
            if stage in _SAMPLER_SECTIONS:
                trained = point_dir / TRAINER.replace("-", "_")
                section = _SAMPLER_SECTIONS[stage]
                args += [f"{section}.pipeline={trained / 'pipeline'}", f"{section}.raw_weights={trained / 'raw_weights'}"]
        sub = dict(a.split("=", 1) for a in args if "=" in a).get(_SUBDIR_KEYS.get(stage, ""))
        steps.append(Step(spec, stage, tuple(args), out_dir / sub if sub else out_dir))
    return steps


def _overrides() -> list[str]:
    """The pipeline's own command-line overrides (Hydra's task overrides), passed on to every stage."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _run_step(step: Step, overrides: list[str]) -> int:
    command = [sys.executable, "-m", "train.cli", step.stage, *overrides, *step.args]
    return subprocess.call(command)


def run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Run the configured stages in order (complete ones skipped), then write the report."""
    p = cfg.pipeline
    point_dir = run_dir if run_dir.resolve() != (cfg.run.dir / STAGE).resolve() else None
    steps = plan(p.stages, experiment_dir=cfg.run.dir, point_dir=point_dir)
    forced = set(p.force)
    setup_logging(run_dir, STAGE)
    write_config_snapshot(run_dir, cfg)
    times_path = run_dir / "stage_times.json"
    times: dict[str, Any] = json.loads(times_path.read_text()) if times_path.is_file() else {}
    overrides = _overrides()
    failed: tuple[Step, int] | None = None
    start = time.perf_counter()
    for i, step in enumerate(steps, 1):
        if step.complete and step.spec not in forced:
            log.info("[%d/%d] %s: complete, skipped (%s)", i, len(steps), step.spec, step.out_dir)
            times[step.spec] = {**times.get(step.spec, {}), "status": "skipped (complete)"}
            continue
        log.info("[%d/%d] %s ...", i, len(steps), step.spec)
        t0 = time.perf_counter()
        code = _run_step(step, overrides)
        seconds = round(time.perf_counter() - t0, 1)
        status = "ran" if code == 0 else f"failed (exit {code})" if code > 0 else f"killed by signal {-code}"
        times[step.spec] = {"seconds": seconds, "status": status}
        write_json_atomic(times_path, times)
        if code:
            failed = (step, code if code > 0 else 1)  # killed: a crash as far as our exit codes go
            break
        log.info("[%d/%d] %s: done in %.1f s", i, len(steps), step.spec, seconds)
    write_json_atomic(times_path, times)
    report = write_report(steps, times, point_dir or cfg.run.dir, run_name=cfg.run.name, experiment_dir=cfg.run.dir,
                          captioned=cfg.evaluate_captioner.input, examples=p.report_examples)
    summary = {"stages": {s.spec: times.get(s.spec, {}).get("status", "not run") for s in steps},
               "seconds": round(time.perf_counter() - start, 1), "report": str(report),
               "failed": failed[0].spec if failed else None}
    if failed:
        log.error("%s failed with exit code %d; fix it and rerun `recap pipeline` to continue from there (%s)",
                  failed[0].spec, failed[1], report)
        raise SystemExit(failed[1])
    finish_stage(run_dir, STAGE, summary)
    return summary
