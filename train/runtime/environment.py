"""What the launcher told this process through its environment (torchrun's and DeepSpeed's
launchers set WORLD_SIZE, RANK and LOCAL_RANK). The one place outside the runtime's own
process setup that reads them; stages ask here."""

from __future__ import annotations

import os


def launched_world_size() -> int:
    """Processes the launcher started for this job (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def global_rank() -> int:
    """This process's rank in the whole job (0 when run directly)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its node (0 when run directly)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_node_console() -> bool:
    """Whether this process owns its node's console (progress bars, log lines): local rank 0,
    so one per node under torchrun and every Slurm array task."""
    return local_rank() == 0
