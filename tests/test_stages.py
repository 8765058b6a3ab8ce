"""Stage entry points on bad input: one clear error, exit 1, no output left behind."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO, stage_env


def run_stage(cwd, name):
    (cwd / "stages").exists() or (cwd / "stages").symlink_to(REPO / "stages")
    return subprocess.run([sys.executable, "-m", f"stages.{name}"], cwd=cwd, env=stage_env(),
                          capture_output=True, text=True)


def write_params(cwd, data=None, policy=None):
    raw = {"data": data or {}, "policy": policy or {}}
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "prompt file not found"),
        (b"", "file is empty"),
        (b'{"prompt": "a"}\n{"q": "b"}\n', "p.jsonl:2: no field 'prompt'"),
        (b'{"prompt": "\xff"}\n', "p.jsonl:1: invalid UTF-8"),
    ],
)
def test_prepare_prompts_bad_file(tmp_path, content, message):
    (tmp_path / "data/sources").mkdir(parents=True)
    if content is not None:
        (tmp_path / "data/sources/p.jsonl").write_bytes(content)
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "num_prompts": 2, "test_size": 1})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data/prompts").exists() or not any((tmp_path / "data/prompts").iterdir())


def test_prepare_prompts_from_file(tmp_path):
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/p.jsonl").write_text("".join(f'{{"q": "question {i}"}}\n' for i in range(6)))
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "prompt_field": "q",
                            "num_prompts": 5, "test_size": 2})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "data/prompts/train.parquet").num_rows == 3
    assert pq.read_table(tmp_path / "data/prompts/test.parquet").num_rows == 2


def test_prepare_model_unknown_path(tmp_path):
    write_params(tmp_path, policy={"model": "./no/such/model"})
    proc = run_stage(tmp_path, "prepare_model")
    assert proc.returncode == 1
    assert "error: policy.model: local path './no/such/model' does not exist" in proc.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_unknown_source_named(tmp_path):
    write_params(tmp_path, {"source": "s3"})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1 and "params.yaml: data.source:" in proc.stderr


def test_generate_without_prompts(tmp_path):
    write_params(tmp_path)
    proc = run_stage(tmp_path, "generate")
    assert proc.returncode == 1 and "data/prompts/train.parquet: input file not found" in proc.stderr
    assert not (tmp_path / "data/generations.parquet").exists()
