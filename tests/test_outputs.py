import json
import os

import pyarrow as pa
import pytest

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import atomic_dir, atomic_file, read_parquet, write_json, write_parquet


def test_failed_write_leaves_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.parquet"]


def test_failed_dir_write_leaves_nothing(tmp_path):
    target = tmp_path / "base"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_dir_replaces_previous_output(tmp_path):
    target = tmp_path / "base"
    (target).mkdir()
    (target / "stale.bin").write_text("x")
    with atomic_dir(target) as tmp:
        (tmp / "new.bin").write_text("y")
    assert sorted(p.name for p in target.iterdir()) == ["new.bin"]


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path):
    (tmp_path / ".gen.parquet.tmp-abc").write_text("half")
    (tmp_path / ".base.tmp-def").mkdir()
    write_json({"a": 1}, tmp_path / "gen.parquet")
    with atomic_dir(tmp_path / "base"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "gen.parquet"]


def test_parquet_bytes_are_deterministic_and_metadata_free(tmp_path):
    table = pa.table({"prompt_id": ["b", "a"], "ids": [[1, 2], [3]]}).replace_schema_metadata({"pandas": "x"})
    write_parquet(table, tmp_path / "1.parquet")
    write_parquet(table, tmp_path / "2.parquet")
    assert (tmp_path / "1.parquet").read_bytes() == (tmp_path / "2.parquet").read_bytes()
    back = read_parquet(tmp_path / "1.parquet", {"prompt_id": pa.string()})
    assert back.schema.metadata is None and back.column("ids").to_pylist() == [[1, 2], [3]]


def test_read_parquet_names_missing_file_and_column(tmp_path):
    with pytest.raises(PipelineError, match="input file not found"):
        read_parquet(tmp_path / "none.parquet")
    write_parquet(pa.table({"x": [1]}), tmp_path / "t.parquet")
    with pytest.raises(PipelineError, match="missing column 'prompt'"):
        read_parquet(tmp_path / "t.parquet", {"prompt": pa.string()})
    with pytest.raises(PipelineError, match="has type int64, expected string"):
        read_parquet(tmp_path / "t.parquet", {"x": pa.string()})


def test_json_metrics_sorted_and_nan_free(tmp_path):
    write_json({"b": float("nan"), "a": 1.5}, tmp_path / "m.json")
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == {"a": 1.5, "b": None} and text.index('"a"') < text.index('"b"')


def test_a_group_whose_metrics_path_is_a_folder_replaces_nothing(tmp_path):
    from rlhf_pipeline.outputs import output_group

    (tmp_path / "pairs.parquet").write_text("old pairs")
    (tmp_path / "metrics.json").mkdir()  # a folder where the stage writes its metrics file
    with pytest.raises(PipelineError, match="metrics.json: is a folder"):
        with output_group():
            write_parquet(pa.table({"x": [1]}), tmp_path / "pairs.parquet")
            write_json({"a": 1}, tmp_path / "metrics.json")
    assert (tmp_path / "pairs.parquet").read_text() == "old pairs"  # the group was not half-applied
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "pairs.parquet"]


def test_file_system_refusals_are_one_line_errors(tmp_path):
    (tmp_path / "metrics").write_text("a file where a folder is needed")
    with pytest.raises(PipelineError, match="cannot create the output's folder"):
        write_json({"a": 1}, tmp_path / "metrics" / "m.json")
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        if not os.access(readonly, os.W_OK):  # root ignores the mode bits
            with pytest.raises(PipelineError, match="cannot write in"):
                write_json({"a": 1}, readonly / "m.json")
    finally:
        readonly.chmod(0o755)

    class DiskFull(OSError):
        pass

    with pytest.raises(PipelineError, match="m.json: cannot write the output \\(No space left on device\\)"):
        with atomic_file(tmp_path / "m.json"):
            raise DiskFull(28, "No space left on device")
    assert not any(p.name.startswith(".m.json") for p in tmp_path.iterdir())
