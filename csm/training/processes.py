"""Where this process stands in a torchrun launch, from the variables torchrun sets: known before
any process group exists (and without torch), so the CLI and the run can ask it up front."""

from __future__ import annotations

import os


def process_rank() -> int:
    """This process's rank (0 alone, or the first of a launch)."""
    return int(os.environ.get("RANK", "0"))


def process_count() -> int:
    """How many processes the launch has (1 alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_first_process() -> bool:
    """The one that writes outputs, logs and prints results."""
    return process_rank() == 0
