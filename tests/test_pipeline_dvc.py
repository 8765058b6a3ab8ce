"""`dvc repro` of the whole DAG (prepare_model ... evaluate, report) on a tiny config, in a temporary git clone."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import copy_project, lock_md5s, ran, run_dvc, set_param, stage_env
from rlhf_pipeline.generation import GENERATIONS_SCHEMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory):
    """A copy of the tiny project that this module's tests may change, in file order."""
    return copy_project(tiny_project, tmp_path_factory.mktemp("pipeline") / "proj")


def test_outputs_and_schema(project):
    train = pq.read_table(project / "data/prompts/train.parquet")
    test = pq.read_table(project / "data/prompts/test.parquet")
    assert (train.num_rows, test.num_rows) == (12, 4)
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
                                       "data/ref_logprobs.parquet", "models/policy", "data/eval.parquet"}
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["updates"] == pairs.num_rows // 2 and train["resumed_from_update"] == 0
    assert (project / "metrics/train_log.tsv").read_text().count("\n") == train["updates"] + 1
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(project / "models/policy").config.num_hidden_layers == 2
    # No temporary leftovers beside the outputs.
    assert not [p for p in (project / "data").rglob(".*tmp-*")]


def test_evaluate_outputs_are_consistent(project):
    table = pq.read_table(project / "data/eval.parquet")
    test_ids = sorted(pq.read_table(project / "data/prompts/test.parquet").column("prompt_id").to_pylist())
    assert table.num_rows == 4 * 2
    assert sorted(set(table.column("prompt_id").to_pylist())) == test_ids
    # The same seed per response for both policies (a paired comparison).
    assert table.column("base_seed").to_pylist() == table.column("trained_seed").to_pylist()
    m = json.loads((project / "metrics/eval.json").read_text())
    assert m["test_prompts"] == 4 and m["responses_per_prompt"] == 2
    for name in ("base", "trained"):
        rewards = table.column(f"{name}_reward").to_pylist()
        assert m[name]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
        assert m[name]["mean_response_tokens"] == pytest.approx(
            sum(table.column(f"{name}_num_tokens").to_pylist()) / 8, abs=1e-6)
        for key in ("ifeval_prompt_accuracy_loose", "ifeval_prompt_accuracy_strict",
                    "ifeval_instruction_accuracy_loose", "ifeval_instruction_accuracy_strict"):
            assert 0 <= m[name][key] <= 1
    r, w = m["reward"], m["win_rate"]
    assert r["diff"] == pytest.approx(r["trained"] - r["base"], abs=1e-5)
    assert r["diff_ci_low"] <= r["diff"] <= r["diff_ci_high"]
    assert 0 <= w["ci_low"] <= w["value"] <= w["ci_high"] <= 1
    assert w["wins"] + w["ties"] + w["losses"] == 4
    kl, log_ratio = table.column("kl").to_pylist(), table.column("kl_log_ratio").to_pylist()
    assert m["kl"]["mean"] == pytest.approx(sum(kl) / len(kl), abs=1e-5) and min(kl) >= 0
    assert m["kl"]["log_ratio_mean"] == pytest.approx(sum(log_ratio) / len(log_ratio), abs=1e-5)
    hist = (project / "metrics/eval_reward_hist.tsv").read_text().splitlines()
    assert hist[0] == "reward\tbase\ttrained"
    assert sum(int(line.split("\t")[1]) for line in hist[1:]) == 8


def test_report_logs_one_mlflow_run(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.eta"] == "1.0" and run.data.params["seed"] == "7"
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert run.data.metrics["evaluate.win_rate.value"] == pytest.approx(evaluation["win_rate"]["value"])
    assert run.data.metrics["pairs.pairs_out"] == json.loads((project / "metrics/pairs.json").read_text())["pairs_out"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == commit
    assert run.data.tags["dvc.md5.data/pairs.parquet"] == lock_md5s(project)["data/pairs.parquet"]
    history = client.get_metric_history(run.info.run_id, "train_log.loss")
    updates = json.loads((project / "metrics/train.json").read_text())["updates"]
    assert sorted(h.step for h in history) == list(range(1, updates + 1))
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.parquet", "params.yaml", "dvc.lock", "plots"} <= artifacts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` on a free loopback port; stopped by its PID (process group)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(uri + "/health", timeout=1).read()
                break
            except OSError:
                assert proc.poll() is None, "mlflow server exited"
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow server did not start in 120 s")
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def run_report(project, uri: str | None) -> subprocess.CompletedProcess:
    env = stage_env()
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "stages.report"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)


def test_report_to_a_real_mlflow_server(project, mlflow_server):
    from mlflow.tracking import MlflowClient

    proc = run_report(project, mlflow_server)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert run.data.params["train.learning_rate"] == str(params["train"]["learning_rate"])
    assert run.data.params["evaluate.num_responses"] == "2"
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert run.data.metrics["evaluate.reward.diff"] == pytest.approx(evaluation["reward"]["diff"])
    assert run.data.metrics["train.updates"] == json.loads((project / "metrics/train.json").read_text())["updates"]
    assert run.data.tags["dvc.md5.models/policy"] == lock_md5s(project)["models/policy"]
    assert len(run.data.tags["git_commit"]) == 40
    assert "eval.parquet" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unreachable_explicit_server_is_a_clear_error(project):
    before = lock_md5s(project)
    proc = run_report(project, f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLFLOW_TRACKING_URI=http://127.0.0.1:") and "does not answer" in last
    assert "Traceback" not in proc.stderr
    assert lock_md5s(project) == before and (project / "data/eval.parquet").is_file()


def test_params_read_match_dvc_yaml(project, tmp_path, monkeypatch):
    """Each stage's `main`, run in a copy of the tiny project with a params object that records
    every field read, reads exactly the params keys its dvc.yaml entry declares."""
    import importlib
    import shutil

    from test_dvc_deps import STAGES, ParamsRecorder, check_params_read

    from rlhf_pipeline.params import load_params

    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)
    monkeypatch.chdir(copy)
    assert STAGES["report"]["params"] == [{"params.yaml": None}]  # it logs every key
    for stage in STAGES:
        if stage == "report":
            continue
        module = importlib.import_module(f"stages.{stage}")
        recorder = ParamsRecorder(load_params())
        monkeypatch.setattr(module, "load_params", lambda r=recorder: r)
        module.main()
        check_params_read(stage, recorder.leaves())


def test_second_repro_runs_nothing_and_forced_rerun_is_byte_identical(project):
    before = lock_md5s(project)
    out = run_dvc(project, "repro").stdout
    assert "Running stage" not in out
    run_dvc(project, "repro", "--force")
    assert lock_md5s(project) == before


def test_changed_min_reward_gap_reruns_pairs_only(project):
    before = lock_md5s(project)
    set_param(project, "pairs", "min_reward_gap", 1e-4)
    # ref_logprobs and train run only if the pairs file changed (DVC compares the new pairs' hash).
    assert ran(run_dvc(project, "repro").stdout) - {"ref_logprobs", "train", "evaluate", "report"} == {"pairs"}
    after = lock_md5s(project)
    assert {k for k in before if before[k] != after[k]} <= {"data/pairs.parquet", "data/ref_logprobs.parquet",
                                                            "models/policy", "data/eval.parquet"}


def test_missing_eos_penalty_reruns_score_and_shapes_only_the_training_reward(project):
    before = pq.read_table(project / "data/scores.parquet").column("reward").to_pylist()
    old_penalty = yaml.safe_load((project / "params.yaml").read_text())["reward"].get("missing_eos_penalty") or 0.0
    set_param(project, "reward", "missing_eos_penalty", 0.25)
    assert {"score", "pairs"} <= ran(run_dvc(project, "repro").stdout) <= {
        "score", "pairs", "ref_logprobs", "train", "evaluate", "report"}
    gens = pq.read_table(project / "data/generations.parquet").sort_by([("prompt_id", "ascending"),
                                                                         ("response_idx", "ascending")])
    scores = pq.read_table(project / "data/scores.parquet")
    missing = [f == "length" for f in gens.column("finish_reason").to_pylist()]
    assert scores.column("missing_eos").to_pylist() == missing and any(missing)
    assert scores.column("reward").to_pylist() == pytest.approx(
        [r + (old_penalty - 0.25) * m for r, m in zip(before, missing)])
    metrics = json.loads((project / "metrics/score.json").read_text())
    assert metrics["missing_eos_share"] == pytest.approx(sum(missing) / len(missing))
    # evaluate scores with the scorers only, and does not depend on the penalty
    assert not [c for c in pq.read_table(project / "data/eval.parquet").column_names if "missing_eos" in c]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    evaluate_params = lock["stages"]["evaluate"]["params"]["params.yaml"]
    assert "reward.scorers" in evaluate_params and "missing_eos_penalty" not in str(evaluate_params)
    assert lock["stages"]["score"]["params"]["params.yaml"]["reward"]["missing_eos_penalty"] == 0.25


def test_changed_eta_reruns_train_and_later_only(project):
    before = lock_md5s(project)
    set_param(project, "train", "eta", 0.5)
    assert ran(run_dvc(project, "repro").stdout) == {"train", "evaluate", "report"}
    after = lock_md5s(project)
    assert {k for k in before if before[k] != after[k]} == {"models/policy", "data/eval.parquet"}


def test_changed_sampling_param_reruns_generate_and_later(project):
    set_param(project, "generate", "temperature", 0.9)
    assert ran(run_dvc(project, "repro").stdout) == {"generate", "score", "pairs", "ref_logprobs", "train",
                                                     "evaluate", "report"}


def test_changed_log_prob_temperature_reruns_ref_logprobs_and_train(project):
    set_param(project, "train", "allow_temperature_mismatch", True)  # read by no stage but report (logs every key)
    assert ran(run_dvc(project, "repro").stdout) == {"report"}
    set_param(project, "train", "temperature", 1.0)
    assert ran(run_dvc(project, "repro").stdout) == {"ref_logprobs", "train", "evaluate", "report"}


def test_bad_params_fail_before_any_output(project):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generate"]["top_p"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.generate"], cwd=project, env=stage_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: generate.top_p:")
    assert "Traceback" not in proc.stderr
