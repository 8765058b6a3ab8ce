"""Atomic, deterministic writers for stage outputs (Parquet, JSON metrics, model folders).

Every output is written under a temporary sibling name and renamed into place only when
complete, so a killed stage never leaves a half-written file at a path DVC tracks. A stage's
outputs form one group (:func:`output_group`): each is written to its temporary name, and only
when all are written are they renamed into place, one after another with SIGINT and SIGTERM held
off, so an interrupted stage leaves either all its old outputs or all its new ones (SIGKILL can
still land between two renames; DVC then sees the stage as changed and reruns it). Parquet is
written from an Arrow table with fixed writer options and no pandas metadata, so the same rows
give the same bytes (and the same md5 in ``dvc.lock``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_pipeline.errors import PipelineError

_TMP_MARK = ".tmp-"
#: (temporary, final) renames deferred to the end of the open :func:`output_group`, if any.
_GROUP: contextvars.ContextVar[list[tuple[Path, Path]] | None] = contextvars.ContextVar("output_group", default=None)
_DEFERRED_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _install(tmp: Path, final: Path) -> None:
    """Move a finished temporary file or folder onto its final path."""
    if tmp.is_dir():
        os.chmod(tmp, 0o755)
        if final.exists():
            shutil.rmtree(final)
    else:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are ordinary files.
    os.replace(tmp, final)


@contextlib.contextmanager
def output_group() -> Iterator[None]:
    """Write several outputs as one: inside the block, :func:`atomic_file` and :func:`atomic_dir`
    (and every writer built on them) write to temporary names; when the block succeeds, all are
    renamed into place while SIGINT and SIGTERM are held back (then delivered), so neither can
    separate them.

    On an exception (a SIGINT or SIGTERM during the writes included) every temporary is removed
    and every output path is left as it was.
    """
    if _GROUP.get() is not None:  # nested: the outer group commits
        yield
        return
    pending: list[tuple[Path, Path]] = []
    token = _GROUP.set(pending)
    try:
        yield
        _check_targets(pending)
        # Held by a Python handler, not a signal mask: a mask holds a signal back from this thread
        # only, and a process-directed SIGTERM may land on any thread (tokenizers', OpenMP's);
        # Python then runs its handler in the main thread at once, between two renames.
        held: list[int] = []
        previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in _DEFERRED_SIGNALS}
        try:
            while pending:
                _install(*pending[0])
                pending.pop(0)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            if held:
                signal.raise_signal(held[0])  # now, to the stage's own handler
    finally:
        _GROUP.reset(token)
        for tmp, _ in pending:
            _remove(tmp)


def _check_targets(pending: list[tuple[Path, Path]]) -> None:
    """Every rename of a group must be possible before the first is made: a file cannot replace a
    folder (nor a folder a file), so such a target would fail half-way through the group.

    Raises:
        PipelineError: naming the first target that cannot be replaced; nothing is renamed.
    """
    for tmp, final in pending:
        if final.is_symlink() or not final.exists():
            continue
        if tmp.is_dir() != final.is_dir():
            what = "a folder" if final.is_dir() else "a file"
            raise PipelineError(f"{final}: is {what}, where the stage writes {'a folder' if tmp.is_dir() else 'a file'}; "
                                "move it away (no output of the stage was replaced)")


def _clear_stale_temporaries(final: Path) -> None:
    # A SIGKILLed earlier run can leave its temporary sibling behind; it is never a valid output.
    for stale in final.parent.glob(f".{final.name}{_TMP_MARK}*"):
        _remove(stale)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    final = Path(path)
    _prepare(final)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}{_TMP_MARK}", dir=final.parent)
    except OSError as exc:
        raise PipelineError(f"{final}: cannot write in {final.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    yield from _finish(Path(tmp_name), final)


def _finish(tmp: Path, final: Path) -> Iterator[Path]:
    """Yield ``tmp``; then install it, or hand it to the open output group; remove it on failure.

    Raises:
        PipelineError: the file system refused the write (disk full, permissions, …), naming ``final``.
    """
    try:
        yield tmp
        group = _GROUP.get()
        if group is None:
            _check_targets([(tmp, final)])
            _install(tmp, final)
        else:
            group.append((tmp, final))
    except OSError as exc:
        _remove(tmp)
        raise PipelineError(f"{final}: cannot write the output ({exc.strerror or exc}); nothing was replaced") from None
    except BaseException:
        _remove(tmp)
        raise


def _prepare(final: Path) -> None:
    """Create ``final``'s folder and clear stale temporaries beside it.

    Raises:
        PipelineError: the folder cannot be made or written (a parent that is a file, no permission).
    """
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_temporaries(final)
    except OSError as exc:
        raise PipelineError(f"{final}: cannot create the output's folder {final.parent} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path``; it replaces ``path`` if the block succeeds.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    final = Path(path)
    _prepare(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{_TMP_MARK}", dir=final.parent))
    except OSError as exc:
        raise PipelineError(f"{final}: cannot write in {final.parent} ({exc.strerror or exc})") from None
    yield from _finish(tmp, final)


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
    """Read a stage's Parquet input and check it before any work is done on it.

    Checks: the file has rows; each ``required`` column exists with its type, holds no null (in
    a list column, no null element either) and, if floating-point, no NaN or infinity. So a
    reward or log-prob that is not a finite number stops the stage that reads it.

    Raises:
        PipelineError: the file is missing, unreadable or empty, or a required column is absent,
            mistyped, null or non-finite (file, column and first bad row named).
    """
    p = Path(path)
    if not p.is_file():
        raise PipelineError(f"{p}: input file not found (run the stage that writes it first)")
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{p}: not a readable Parquet file ({exc})") from exc
    if table.num_rows == 0:
        raise PipelineError(f"{p}: no rows (the stage that wrote it kept nothing; see its metrics file)")
    for name, dtype in (required or {}).items():
        if name not in table.column_names:
            raise PipelineError(f"{p}: missing column {name!r} (has {table.column_names})")
        if dtype is not None and not table.schema.field(name).type.equals(dtype):
            raise PipelineError(
                f"{p}: column {name!r} has type {table.schema.field(name).type}, expected {dtype}"
            )
        _check_values(table.column(name), f"{p}: column {name!r}")
    return table


def _check_values(column: pa.ChunkedArray, where: str) -> None:
    """No null and, for floating-point values, no NaN or infinity (list elements included).

    Raises:
        PipelineError: naming ``where`` and the first bad row.
    """
    import pyarrow.compute as pc

    values = column.combine_chunks()
    bad = values.is_null()
    kind = "null"
    if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        row_of = pc.list_parent_indices(values)
        flat = pc.list_flatten(values)
        inner = flat.is_null()
        if pa.types.is_floating(flat.type):
            inner = pc.or_(inner, pc.invert(pc.is_finite(flat)))
        if pc.any(inner).as_py():
            first = pc.index(inner, True).as_py()
            raise PipelineError(f"{where}: row {row_of[first].as_py()} holds a null or non-finite element")
    elif pa.types.is_floating(values.type):
        bad = pc.or_(bad, pc.invert(pc.fill_null(pc.is_finite(values), True)))
        kind = "null or non-finite (NaN/inf)"
    if pc.any(bad).as_py():
        row = pc.index(bad, True).as_py()
        raise PipelineError(f"{where}: row {row} is {kind} ({values[row].as_py()})")


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
