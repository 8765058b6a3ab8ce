"""The common wrapper of every stage entry point."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Callable, Sequence

from rlhf_pipeline.errors import PipelineError


def _terminate(signum, frame):
    # Python's default for SIGTERM ends the process without unwinding: no `finally`, so temporary
    # outputs stay behind. Raised as KeyboardInterrupt, SIGTERM unwinds exactly as Ctrl-C does.
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def stage_args(argv: Sequence[str] | None, doc: str | None, *options: str, **optional: str):
    """Parse a stage's command line: each of ``options`` is a required ``--option VALUE`` (paths,
    an iteration name), each of ``optional`` an ``--option VALUE`` with that default. Dashes in
    option names become underscores on the result.

    ``dvc.yaml`` passes every input and output this way, so the command shows in → out and one
    stage module serves every iteration. A missing or unknown option exits 2 with argparse's usage.
    """
    import argparse

    parser = argparse.ArgumentParser(description=doc, allow_abbrev=False)
    for name in options:
        parser.add_argument(f"--{name}", required=True)
    for name, default in optional.items():
        parser.add_argument(f"--{name.replace('_', '-')}", default=default)
    return parser.parse_args(argv)


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main``; report a :class:`PipelineError` as one line on stderr, exit 1.

    SIGTERM is handled like SIGINT: the stack unwinds, every temporary output is removed, the
    output paths keep what they held, and the process exits 128 + the signal number. Other
    exceptions keep their traceback: they are bugs, not bad input.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        main()
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as exc:
        name = str(exc) or "signal SIGINT"
        print(f"interrupted ({name}): no partial output was left", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if "SIGTERM" in name else signal.SIGINT))


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ``ru_maxrss`` is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
