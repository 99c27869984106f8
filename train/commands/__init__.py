"""What happens to a `recap` command line before a stage runs: the stage table, exit codes, the Hydra run and sweeps, launchers."""
