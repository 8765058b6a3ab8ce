"""The common wrapper of every stage entry point."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from rlhf_pipeline.errors import PipelineError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; report a :class:`PipelineError` as one line on stderr, exit 1.

    Other exceptions keep their traceback: they are bugs, not bad input.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
