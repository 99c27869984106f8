"""What every training stage drives, engine-agnostic: the loop, run sessions, optimizers, checkpoints, EMA."""
