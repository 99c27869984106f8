"""`recap pipeline`: the plan of stage commands (experiment and sweep-point layouts), skipping
complete stages, stopping at a failed one, continuing after it, and the report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import png_bytes, run_recap, write_shards
from train.config.loading import load_experiment
from train.config.typed import ConfigError
from train.evaluation.heldout import CaptionerEvalItem, heldout_batches, read_prompted
from train.outputs.markdown import cell
from train.outputs.pipeline_report import refresh_sweep_section, write_report
from train.stages.pipeline import plan

STAGES = ["make-toy-data", "finetune-captioner style=ssc", "cache", "train-t2i", "sample", "train-eval-clip", "evaluate"]


def test_plan_of_an_experiment(tmp_path: Path) -> None:
    steps = plan(STAGES, experiment_dir=tmp_path / "toy")
    assert [s.stage for s in steps] == ["make-toy-data", "finetune-captioner", "cache", "train-t2i", "sample",
                                        "train-eval-clip", "evaluate"]
    assert [s.out_dir for s in steps] == [tmp_path / "toy" / d for d in (
        "make_toy_data", "finetune_captioner/ssc", "cache", "train_t2i", "sample", "train_eval_clip", "evaluate")]
    assert steps[1].args == ("style=ssc",) and all(s.args == () for s in steps[2:])


def test_plan_of_a_sweep_point_runs_what_the_caption_mix_changes_in_the_point(tmp_path: Path) -> None:
    point = tmp_path / "toy" / "sweeps" / "pipeline" / "3"
    steps = plan(STAGES, experiment_dir=tmp_path / "toy", point_dir=point)
    for shared in (steps[2], steps[5]):  # cache, train-eval-clip: once for every point
        assert shared.out_dir.parent == tmp_path / "toy" and shared.args == ()
    assert [s.out_dir for s in (steps[3], steps[4], steps[6])] == [point / "train_t2i", point / "sample",
                                                                     point / "evaluate"]
    assert steps[3].args == (f"hydra.run.dir={point / 'train_t2i'}",)
    assert steps[4].args == (f"hydra.run.dir={point / 'sample'}",
                             f"sample.sampler.pipeline={point / 'train_t2i' / 'pipeline'}",
                             f"sample.sampler.raw_weights={point / 'train_t2i' / 'raw_weights'}")
    assert steps[6].args[1] == f"evaluate.sampler.pipeline={point / 'train_t2i' / 'pipeline'}"


def test_plan_rejects_unknown_stages(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'train-gan' is not a stage"):
        plan(["make-toy-data", "train-gan"], experiment_dir=tmp_path)
    with pytest.raises(ConfigError, match="'pipeline' is not a stage"):
        plan(["pipeline"], experiment_dir=tmp_path)


def test_markdown_cells_escape_what_would_break_a_row() -> None:
    assert cell("a | b\nc") == "a \\| b c"
    assert (cell(None), cell(0.123456, 2), cell(3, 3)) == ("–", "0.12", "3.000")


def test_report_from_plain_values_says_what_has_not_run(tmp_path: Path) -> None:
    experiment = tmp_path / "toy"
    steps = plan(["make-toy-data", "sample"], experiment_dir=experiment)
    (experiment / "evaluate_captioner").mkdir(parents=True)
    (experiment / "evaluate_captioner" / "summary.json").write_text(json.dumps(
        {"samples": 4, "ssc_recall": 0.5, "ssc_precision": 0.75, "ssc_recall_other_image": 0.25,
         "ssc_colour_shape_recall": 0.125, "ssc_distinct": 3, "ssc_stutters": 1,
         "dsc_recall": 0.5}))
    (experiment / "sample").mkdir()
    (experiment / "sample" / "grid.png").write_bytes(b"")
    (experiment / "sample" / "prompts.jsonl").write_text(json.dumps({"rewritten": "a | b"}) + "\n")
    path = write_report(steps, {"make-toy-data": {"seconds": 1.25, "status": "ran"}}, experiment, run_name="toy",
                        experiment_dir=experiment, captioned=str(tmp_path / "none"), examples=2)
    report = path.read_text()
    assert path == experiment / "report.md" and report.startswith("# toy: the recipe end to end\n")
    assert f"| `make-toy-data` | ran | 1.2 | `{experiment / 'make_toy_data'}` |" in report
    assert f"| `sample` | not run |  | `{experiment / 'sample'}` |" in report
    assert report.count("_`recap evaluate-captioner` has not run._") == 1  # the scores ran, the examples did not
    assert "| ssc | 0.750 | 0.500 | 0.250 | 0.125 | 3 / 4 | 1 / 4 |" in report
    assert "| dsc | nan | 0.500 | nan | nan | – | – |" in report  # an older summary's missing values
    assert "1. a \\| b" in report and "![samples](sample/grid.png)" in report
    assert "_`recap evaluate` has not run._" in report
    assert report.endswith("## Caption-mix sweep\n\n_No sweep yet: `make sweep` (`recap pipeline -m caption_mix.dsc=...`, "
                           "then `recap sweep-report`)._\n")


def test_the_caption_examples_are_evaluate_captioners_first_held_out_images_found_by_key(tmp_path: Path) -> None:
    shards = write_shards(tmp_path / "heldout", [{"png": png_bytes(Image.new("RGB", (8, 8), (i, 0, 0))), "txt": b"x"}
                                                 for i in range(6)], per_shard=3)
    experiment = tmp_path / "toy"
    (experiment / "evaluate_captioner").mkdir(parents=True)
    keys = ["000004", "000001", "000009"]  # reading order; 000009 is in no shard
    examples = {source: [{"key": k, "caption": f"{source} of {k} | x"} for k in keys]
                for source in ("alt-text", "ssc", "dsc", "gt_dsc")}
    (experiment / "evaluate_captioner" / "caption_eval.json").write_text(json.dumps({"examples": examples}))
    report = write_report([], {}, experiment, run_name="toy", experiment_dir=experiment, captioned=str(shards),
                          examples=3).read_text()
    rows = [line for line in report.splitlines() if line.startswith("| ![") or line.startswith("| _(image")]
    assert rows == ["| ![000004](report_assets/000004.png) | alt-text of 000004 \\| x | ssc of 000004 \\| x | "
                    "dsc of 000004 \\| x |",
                    "| ![000001](report_assets/000001.png) | alt-text of 000001 \\| x | ssc of 000001 \\| x | "
                    "dsc of 000001 \\| x |",
                    "| _(image 000009 not found)_ | alt-text of 000009 \\| x | ssc of 000009 \\| x | dsc of 000009 \\| x |"]
    assert Image.open(experiment / "report_assets" / "000004.png").getpixel((0, 0)) == (4, 0, 0)
    assert sorted(p.name for p in (experiment / "report_assets").iterdir()) == ["000001.png", "000004.png"]
    two = write_report([], {}, experiment, run_name="toy", experiment_dir=experiment, captioned=str(shards),
                       examples=2).read_text()
    assert "000009" not in two and "The first 2 held-out images" in two


@pytest.mark.parametrize("shards", ["heldout/00001.tar", "heldout"])  # the toy's one shard; two shards, two workers
def test_evaluate_captioner_reads_evaluates_images_in_evaluates_order(toy_data: Path, shards: str) -> None:
    """The report's caption examples, evaluate's examples.png and the sweep's heldout.png show the
    same held-out images: evaluate-captioner reads evaluate's input in the order evaluate does."""
    assert load_experiment([]).evaluate_captioner.input == load_experiment([]).evaluate.input  # the demo's default
    cfg = load_experiment([f"evaluate.input={toy_data / shards}", "data.reader.num_workers=2"])
    assert cfg.evaluate_captioner.input == str(toy_data / shards)
    e = cfg.evaluate_captioner
    batches = heldout_batches(e.input, "evaluate_captioner.input", CaptionerEvalItem(bool),
                              reader=cfg.data.reader, seed=cfg.seed, batch_size=e.batch_size, fix="", texts=("txt",))
    captioned = [alt for batch in batches for _, _, alt, _ in batch][:20]
    drawn = read_prompted(dataclasses.replace(cfg.evaluate, samples=20, size=8), cfg.data.reader, cfg.seed, False)
    assert len(set(captioned)) > 10 and captioned == drawn.alt_texts


SWEEP_MD = "# Sweep over caption_mix.dsc (runs/toy/sweeps/pipeline)\n\n| caption_mix.dsc | n |\n|---:|---:|\n| {} | 2 |\n\n" \
           "![sweep](sweep.png)\n\n![each value's first point](grid.png)\n"


def test_the_experiments_report_ends_with_its_sweep_and_sweep_report_rewrites_that_section(tmp_path: Path) -> None:
    experiment = tmp_path / "toy"
    (experiment / "sweep_report").mkdir(parents=True)
    (experiment / "sweep_report" / "sweep.md").write_text(SWEEP_MD.format(0.5))
    steps = plan(["make-toy-data"], experiment_dir=experiment)
    args = dict(run_name="toy", experiment_dir=experiment, captioned=str(tmp_path / "none"), examples=0)
    report = write_report(steps, {}, experiment, **args).read_text()
    section = report[report.index("## Caption-mix sweep\n"):]
    assert section == ("## Caption-mix sweep\n\nSweep over caption_mix.dsc (runs/toy/sweeps/pipeline), from `recap "
                       "sweep-report` (`sweep_report/sweep.md`):\n\n| caption_mix.dsc | n |\n|---:|---:|\n| 0.5 | 2 |\n\n"
                       "![sweep](sweep_report/sweep.png)\n\n![each value's first point](sweep_report/grid.png)\n")
    before = report[: report.index("## Caption-mix sweep\n")]
    (experiment / "sweep_report" / "sweep.md").write_text(SWEEP_MD.format(0.95))  # a later sweep-report
    assert refresh_sweep_section(experiment) == experiment / "report.md"
    refreshed = (experiment / "report.md").read_text()
    assert refreshed == before + section.replace("| 0.5 | 2 |", "| 0.95 | 2 |")  # only the sweep section changed
    point = experiment / "sweeps" / "pipeline" / "0"  # a sweep point's own report: no sweep section
    assert "## Caption-mix sweep" not in write_report(steps, {}, point, **args).read_text()


def test_refreshing_the_sweep_section_appends_it_to_an_older_report_and_writes_no_new_one(tmp_path: Path) -> None:
    assert refresh_sweep_section(tmp_path) is None and not (tmp_path / "report.md").exists()
    (tmp_path / "report.md").write_text("# toy: the recipe end to end\n\n## Evaluation\n\nx\n")  # written before it had one
    refresh_sweep_section(tmp_path)
    assert (tmp_path / "report.md").read_text() == ("# toy: the recipe end to end\n\n## Evaluation\n\nx\n\n"
                                                    "## Caption-mix sweep\n\n_No sweep yet: `make sweep` (`recap "
                                                    "pipeline -m caption_mix.dsc=...`, then `recap sweep-report`)._\n")


@pytest.mark.slow
def test_a_killed_stage_stops_the_pipeline_and_a_rerun_continues_from_it(tmp_path: Path) -> None:
    args = ["pipeline", f"run.root={tmp_path}", "pipeline.stages=[make-toy-data,train-vae]",
            "data.toy.train_shards=2", "data.toy.heldout_shards=1", "data.toy.samples_per_shard=16",
            "train_vae.steps=4", "train_vae.global_batch_size=4", "train_vae.micro_batch_size=4",
            "train_vae.resolution=32", "vae.block_out_channels=[8,16,16,16]", "vae.norm_num_groups=8",
            "checkpoint.every_steps=2", "data.reader.num_workers=0", "logger.progress=false",
            "logger.wandb.mode=disabled"]
    killed = run_recap(args, env={"RECAP_FAULT": "sigkill@step=3"})
    experiment = tmp_path / "toy"
    assert killed.returncode == 1, killed.stderr[-3000:]
    assert "train-vae failed" in killed.stderr
    times = json.loads((experiment / "pipeline" / "stage_times.json").read_text())
    assert times["make-toy-data"]["status"] == "ran" and times["train-vae"]["status"] == "killed by signal 9"
    report = (experiment / "report.md").read_text()
    assert "| `train-vae` | killed by signal 9 |" in report
    toy_summary = (experiment / "make_toy_data" / "summary.json").stat().st_mtime_ns

    rerun = run_recap(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert (experiment / "make_toy_data" / "summary.json").stat().st_mtime_ns == toy_summary  # skipped
    vae = json.loads((experiment / "train_vae" / "summary.json").read_text())
    assert vae["resumed"] is True and vae["steps"] == 4
    times = json.loads((experiment / "pipeline" / "stage_times.json").read_text())
    assert times["make-toy-data"]["status"] == "skipped (complete)" and times["make-toy-data"]["seconds"] > 0
    assert times["train-vae"]["status"] == "ran"
    report = (experiment / "report.md").read_text()
    assert "| `make-toy-data` | skipped (complete) |" in report and "| `train-vae` | ran |" in report
    assert report.count("_`recap evaluate-captioner` has not run._") == 2  # examples and scores: it did not run
    summary = json.loads((experiment / "pipeline" / "summary.json").read_text())
    assert summary["stages"] == {"make-toy-data": "skipped (complete)", "train-vae": "ran"}


@pytest.mark.slow
def test_a_caption_mix_sweep_trains_and_samples_once_per_point(toy_data: Path, tmp_path: Path) -> None:
    """`recap pipeline -m caption_mix.dsc=0.0,1.0`: each point trains with its own mix in its own
    directory, and its sample stage draws from that point's export; nothing lands in the shared
    stage directories."""
    from data_pipeline.caption_tokenizer import save_tokenizer
    from models.vae import build_vae
    from tests.helpers import toy_tokenizer, write_captioned_shards

    import torch

    shards = write_captioned_shards(toy_data / "train", tmp_path / "captioned")
    tokenizer = save_tokenizer(toy_tokenizer(24), tmp_path / "tokenizer")
    torch.manual_seed(0)
    build_vae([8, 16, 16, 16], layers_per_block=1, norm_num_groups=8).save_pretrained(tmp_path / "vae")
    result = run_recap([
        "pipeline", "-m", "caption_mix.dsc=0.0,1.0", f"run.root={tmp_path}", "pipeline.stages=[train-t2i,sample]",
        "train_t2i.cache=null", f"train_t2i.input={shards}", f"train_t2i.vae={tmp_path / 'vae'}",
        f"text_encoder.tokenizer={tokenizer}", "text_encoder.max_tokens=24",
        "text_encoder.architecture={d_model: 32, d_kv: 8, d_ff: 64, num_layers: 1, num_heads: 4}",
        "unet.block_out_channels=[32,32,64]", "unet.attention_head_dim=8", "unet.xf_width=32", "unet.xf_heads=4",
        "train_t2i.stages=[{resolution: 64, steps: 3, global_batch_size: 4, micro_batch_size: 4}]",
        "train_t2i.sampling.every_steps=null", "train_t2i.sampling.prompts=[]", "sample.prompts=[a red circle]",
        "sample.height=32", "sample.width=32", "sample.sampler.steps=2", "data.reader.num_workers=0",
        "logger.progress=false", "logger.wandb.mode=disabled"], timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    sweep = tmp_path / "toy" / "sweeps" / "pipeline"
    for point, dsc in (("0", 0.0), ("1", 1.0)):
        trained = json.loads((sweep / point / "train_t2i" / "summary.json").read_text())
        mix = trained["caption_mix"]
        if dsc == 1.0:
            assert (mix["caption_mix/txt"], mix["caption_mix/dsc"], mix["caption_mix/fallback"]) == (0, 1, 0)
        else:  # every sample draws the alt-text; those without one fall back to their DSC
            assert mix["caption_mix/dsc"] == mix["caption_mix/fallback"] < 0.3
            assert mix["caption_mix/txt"] + mix["caption_mix/dsc"] == 1.0
        sampled = json.loads((sweep / point / "sample" / "summary.json").read_text())
        assert sampled["pipeline"] == str(sweep / point / "train_t2i" / "pipeline") and sampled["images"] == 1
        assert "| `train-t2i` | ran |" in (sweep / point / "report.md").read_text()
    assert not (tmp_path / "toy" / "train_t2i").exists() and not (tmp_path / "toy" / "sample").exists()
