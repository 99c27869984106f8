"""Exactly the `recap` stages, one file each, named like the stage: run(cfg, run_dir) [+ check(cfg)]."""
