"""The one exception type a stage reports as a clean, single-message failure."""


class PipelineError(Exception):
    """Bad input or configuration: the message names the file, row or params key at fault.

    Stages print it without a traceback (see :func:`rlhf_pipeline.cli.run_stage`) and exit 1,
    before any output is written.
    """
