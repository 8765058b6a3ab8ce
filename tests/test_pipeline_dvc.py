"""`dvc repro` of the whole DAG (prepare_model ... train) on a tiny config, in a temporary git clone."""

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, make_project_clone, run_dvc, stage_env
from rlhf_pipeline.generation import GENERATIONS_SCHEMA

pytestmark = pytest.mark.slow


def tiny_params(model_dir, reward_model_dir) -> dict:
    """The repository's params.yaml with tiny overrides (DVC needs every declared key present)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in tiny_overrides(model_dir, reward_model_dir).items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    return params


def tiny_overrides(model_dir, reward_model_dir) -> dict:
    return {
        "seed": 7,
        "policy": {"model": str(model_dir)},
        "data": {"source": "ifeval", "num_prompts": 14, "test_size": 2},
        "generate": {"num_responses": 4, "max_new_tokens": 16, "batch_size": 16, "dtype": "float32"},
        # A random tiny policy follows no IFEval instruction, so every IFEval reward ties; the tiny
        # reward model's continuous score gives each prompt a spread, hence pairs.
        "reward": {"scorers": [{"name": "ifeval", "weight": 1.0},
                               {"name": "sequence-classification", "weight": 1.0,
                                "options": {"model": str(reward_model_dir), "dtype": "float32"}}]},
        "pairs": {"max_prompt_tokens": 1024, "max_response_tokens": 2048, "min_reward_gap": 0.0},
        "train": {"temperature": 0.8, "dtype": "float32", "logprob_batch_size": 4, "learning_rate": 1e-4,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 2},
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory, raw_tiny_model_dir, tiny_reward_model_dir):
    proj = make_project_clone(tmp_path_factory.mktemp("clone") / "proj")
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(raw_tiny_model_dir, tiny_reward_model_dir)))
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
    assert (train.num_rows, test.num_rows) == (12, 2)
    assert {"prompt_id", "prompt", "key", "instruction_id_list", "kwargs"} <= set(train.column_names)
    gens = pq.read_table(project / "data/generations.parquet")
    assert gens.schema == GENERATIONS_SCHEMA
    assert gens.num_rows == 12 * 4
    assert set(gens.column("prompt_id").to_pylist()) == set(train.column("prompt_id").to_pylist())
    assert not set(gens.column("prompt_id").to_pylist()) & set(test.column("prompt_id").to_pylist())
    metrics = json.loads((project / "metrics/generate.json").read_text())
    assert metrics["responses"] == 48 and metrics["tokens_generated"] == sum(gens.column("num_tokens").to_pylist())
    assert 0 <= metrics["truncated_share"] <= 1 and metrics["dtype"] == "float32"
    assert (project / "models/base/model.safetensors").is_file()
    scores = pq.read_table(project / "data/scores.parquet")
    assert scores.num_rows == 48
    assert {"reward", "reward_ifeval", "ifeval_strict", "reward_sequence_classification"} <= set(scores.column_names)
    pairs = pq.read_table(project / "data/pairs.parquet")
    counts = json.loads((project / "metrics/pairs.json").read_text())
    assert pairs.num_rows == counts["pairs_out"] >= 1
    assert counts["prompts_in"] == 12
    assert all(c > r for c, r in zip(pairs.column("chosen_reward").to_pylist(), pairs.column("rejected_reward").to_pylist()))
    ref = pq.read_table(project / "data/ref_logprobs.parquet")
    assert ref.column("prompt_id").to_pylist() == pairs.column("prompt_id").to_pylist()
    assert all(v < 0 for c in ("chosen_logprob", "rejected_logprob") for v in ref.column(c).to_pylist())
    assert set(lock_md5s(project)) == {"models/base", "data/prompts/train.parquet", "data/prompts/test.parquet",
                                       "data/generations.parquet", "data/scores.parquet", "data/pairs.parquet",
                                       "data/ref_logprobs.parquet", "models/policy"}
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["updates"] == pairs.num_rows // 2 and train["resumed_from_update"] == 0
    assert (project / "metrics/train_log.tsv").read_text().count("\n") == train["updates"] + 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(project / "models/policy").config.num_hidden_layers == 2
    # No temporary leftovers beside the outputs.
    assert not [p for p in (project / "data").rglob(".*tmp-*")]


def test_second_repro_runs_nothing_and_forced_rerun_is_byte_identical(project):
    before = lock_md5s(project)
    out = run_dvc(project, "repro").stdout
    assert "Running stage" not in out
    run_dvc(project, "repro", "--force")
    assert lock_md5s(project) == before


def ran(out: str) -> set[str]:
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def set_param(project, section, key, value):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


def test_changed_min_reward_gap_reruns_pairs_only(project):
    before = lock_md5s(project)
    set_param(project, "pairs", "min_reward_gap", 1e-4)
    # ref_logprobs runs only if the pairs file changed (DVC compares the new pairs' hash).
    # ref_logprobs and train run only if the pairs file changed (DVC compares the new pairs' hash).
    assert ran(run_dvc(project, "repro").stdout) - {"ref_logprobs", "train"} == {"pairs"}
    after = lock_md5s(project)
    assert {k for k in before if before[k] != after[k]} <= {"data/pairs.parquet", "data/ref_logprobs.parquet",
                                                            "models/policy"}


def test_changed_eta_reruns_train_only(project):
    before = lock_md5s(project)
    set_param(project, "train", "eta", 0.5)
    assert ran(run_dvc(project, "repro").stdout) == {"train"}
    after = lock_md5s(project)
    assert {k for k in before if before[k] != after[k]} == {"models/policy"}


def test_changed_sampling_param_reruns_generate_and_later(project):
    set_param(project, "generate", "temperature", 0.9)
    assert ran(run_dvc(project, "repro").stdout) == {"generate", "score", "pairs", "ref_logprobs", "train"}


def test_changed_log_prob_temperature_reruns_ref_logprobs_and_train(project):
    set_param(project, "train", "temperature", 1.0)
    assert ran(run_dvc(project, "repro").stdout) == {"ref_logprobs", "train"}


def test_bad_params_fail_before_any_output(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generate"]["top_p"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=project, env=stage_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: generate.top_p:")
    assert "Traceback" not in proc.stderr
