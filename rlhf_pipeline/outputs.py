"""Atomic, deterministic writers for stage outputs (Parquet, JSON metrics, model folders).

Every output is written under a temporary sibling name and renamed into place only when
complete, so a killed stage never leaves a half-written file at a path DVC tracks. Parquet is
written from an Arrow table with fixed writer options and no pandas metadata, so the same rows
give the same bytes (and the same md5 in ``dvc.lock``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_pipeline.errors import PipelineError

_TMP_MARK = ".tmp-"


def _clear_stale_temporaries(final: Path) -> None:
    # A SIGKILLed earlier run can leave its temporary sibling behind; it is never a valid output.
    for stale in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(final)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{_TMP_MARK}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files.
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` if the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clear_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(table: pa.Table, path: str | os.PathLike) -> None:
    """Write ``table`` to ``path`` atomically and byte-deterministically.

    Schema metadata (where pandas would store its index) is dropped; compression, statistics and
    row-group size are fixed so identical rows always give identical bytes.
    """
    table = table.replace_schema_metadata(None)
    with atomic_file(path) as tmp:
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            compression_level=3,
            row_group_size=1 << 20,
            write_statistics=True,
            use_dictionary=True,
        )


def read_parquet(path: str | os.PathLike, required: dict[str, pa.DataType] | None = None) -> pa.Table:
    """Read a stage's Parquet input and check it has the ``required`` columns and types.

    Raises:
        PipelineError: the file is missing, unreadable, or lacks a required column (named).
    """
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: input file not found (run the stage that writes it first)")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{p}: not a readable Parquet file ({exc})") from exc
    for name, dtype in (required or {}).items():
        if name not in table.column_names:
            raise PipelineError(f"{p}: missing column {name!r} (has {table.column_names})")
        if dtype is not None and not table.schema.field(name).type.equals(dtype):
            raise PipelineError(
                f"{p}: column {name!r} has type {table.schema.field(name).type}, expected {dtype}"
            )
    return table


def _finite(obj: Any) -> Any:
    # JSON has no NaN/inf; an undefined figure (e.g. tokens/s of zero tokens) becomes null.
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write a metrics dict as sorted, indented JSON, atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_finite(obj), indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_tsv(rows: list[dict[str, Any]], columns: tuple[str, ...] | list[str], path: str | os.PathLike) -> None:
    """Write rows as a tab-separated table with a header (the format ``dvc plots`` reads),
    floats to 6 significant digits, atomically."""
    lines = ["\t".join(columns)]
    lines += ["\t".join(f"{r[c]:.6g}" if isinstance(r[c], float) else str(r[c]) for c in columns) for r in rows]
    with atomic_file(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
