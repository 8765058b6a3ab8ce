"""`dvc repro` of prepare_model -> prepare_prompts -> generate on a tiny config, in a git clone."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import make_project_clone, run_dvc, stage_env
from rlhf_pipeline.generation import GENERATIONS_SCHEMA

pytestmark = pytest.mark.slow


def tiny_params(model_dir) -> dict:
    return {
        "seed": 7,
        "policy": {"model": str(model_dir)},
        "data": {"source": "ifeval", "num_prompts": 5, "test_size": 2},
        "generate": {"num_responses": 2, "max_new_tokens": 6, "batch_size": 4, "dtype": "float32"},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, raw_tiny_model_dir):
    proj = make_project_clone(tmp_path_factory.mktemp("clone") / "proj")
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw_tiny_model_dir)))
    run_dvc(proj, "repro")
    return proj


def lock_md5s(proj) -> dict[str, str]:
    """md5 of every data and model output in dvc.lock (metrics hold timings, so they differ)."""
    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
            if not o["path"].startswith("metrics/")}


def test_outputs_and_schema(project):
    train = pq.read_table(project / "data/prompts/train.parquet")
    test = pq.read_table(project / "data/prompts/test.parquet")
    assert (train.num_rows, test.num_rows) == (3, 2)
    assert {"prompt_id", "prompt", "key", "instruction_id_list", "kwargs"} <= set(train.column_names)
    gens = pq.read_table(project / "data/generations.parquet")
    assert gens.schema == GENERATIONS_SCHEMA
    assert gens.num_rows == 3 * 2
    assert set(gens.column("prompt_id").to_pylist()) == set(train.column("prompt_id").to_pylist())
    assert not set(gens.column("prompt_id").to_pylist()) & set(test.column("prompt_id").to_pylist())
    metrics = json.loads((project / "metrics/generate.json").read_text())
    assert metrics["responses"] == 6 and metrics["tokens_generated"] == sum(gens.column("num_tokens").to_pylist())
    assert 0 <= metrics["truncated_share"] <= 1 and metrics["dtype"] == "float32"
    assert (project / "models/base/model.safetensors").is_file()
    assert set(lock_md5s(project)) == {"models/base", "data/prompts/train.parquet",
                                       "data/prompts/test.parquet", "data/generations.parquet"}
    # No temporary leftovers beside the outputs.
    assert not [p for p in (project / "data").rglob(".*tmp-*")]


def test_second_repro_runs_nothing_and_forced_rerun_is_byte_identical(project):
    before = lock_md5s(project)
    out = run_dvc(project, "repro").stdout
    assert "Running stage" not in out
    run_dvc(project, "repro", "--force")
    assert lock_md5s(project) == before


def test_changed_sampling_param_reruns_generate_only(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generate"]["temperature"] = 1.1
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    out = run_dvc(project, "repro").stdout
    assert "Running stage 'generate'" in out
    assert "Running stage 'prepare_model'" not in out and "Running stage 'prepare_prompts'" not in out


def test_bad_params_fail_before_any_output(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generate"]["top_p"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=project, env=stage_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: generate.top_p:")
    assert "Traceback" not in proc.stderr
