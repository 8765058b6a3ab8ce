"""Fault injection for the reproducibility tests, loaded by Python at start-up when this folder is
on PYTHONPATH. Inert unless RLHF_FAULT is set; then it acts only in the process whose ``-m``
module is RLHF_FAULT_STAGE (e.g. ``stages.generate``), so DVC itself and other stages run as usual,
and only on files whose path contains RLHF_FAULT_PATH (if set).

RLHF_FAULT:
- ``kill-writing-parquet``: write half of the Parquet file, then SIGKILL this process;
- ``kill-writing-safetensors``: write half of the first safetensors file, then SIGKILL;
- ``nondeterministic-parquet``: put the current time in the Parquet file's metadata;
- ``term-writing-parquet``: write half of the Parquet file, then SIGTERM this process;
- ``term-after-first-rename``: SIGTERM this process right after the first ``os.replace`` onto a
  path containing RLHF_FAULT_PATH (between the renames of a multi-file output).
"""

import os
import signal
import sys

FAULT = os.environ.get("RLHF_FAULT")
STAGE = os.environ.get("RLHF_FAULT_STAGE")
PATH_PART = os.environ.get("RLHF_FAULT_PATH", "")


def _in_target(where) -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec is not None and spec.name == STAGE and PATH_PART in str(where)


def _die_after_half(data: bytes, where) -> None:
    with open(where, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


if FAULT == "term-after-first-rename":
    _replace = os.replace
    _sent = []

    def replace(src, dst, *args, **kwargs):
        _replace(src, dst, *args, **kwargs)
        if not _sent and _in_target(dst):
            _sent.append(dst)
            os.kill(os.getpid(), signal.SIGTERM)

    os.replace = replace

if FAULT in ("kill-writing-parquet", "nondeterministic-parquet", "term-writing-parquet"):
    import io
    import time

    import pyarrow.parquet as pq

    _write_table = pq.write_table

    def write_table(table, where, *args, **kwargs):
        if not _in_target(where):
            return _write_table(table, where, *args, **kwargs)
        if FAULT == "nondeterministic-parquet":
            table = table.replace_schema_metadata({"written_at_ns": str(time.time_ns())})
            return _write_table(table, where, *args, **kwargs)
        buf = io.BytesIO()
        _write_table(table, buf, *args, **kwargs)
        if FAULT == "term-writing-parquet":
            data = buf.getvalue()
            with open(where, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises here, mid-write
            return None
        _die_after_half(buf.getvalue(), where)

    pq.write_table = write_table

elif FAULT == "kill-writing-safetensors":
    import safetensors.torch

    _save_file = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if not _in_target(filename):
            return _save_file(tensors, filename, *args, **kwargs)
        _save_file(tensors, filename, *args, **kwargs)
        with open(filename, "rb") as f:
            data = f.read()
        _die_after_half(data, filename)

    safetensors.torch.save_file = save_file
