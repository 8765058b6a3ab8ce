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
from rlhf_pipeline.schemas import GENERATIONS as GENERATIONS_SCHEMA

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tiny_project, tmp_path_factory):
    """A copy of the tiny project that this module's tests may change, in file order."""
    return copy_project(tiny_project, tmp_path_factory.mktemp("pipeline") / "proj")


ITERATIONS = ("iter_1", "iter_2")
PER_ITERATION = ("generate", "score", "pairs", "ref_logprobs", "train", "evaluate")


def stages_of(*names: str) -> set[str]:
    """Stage names for every iteration (``generate`` -> ``generate@iter_1``, ``generate@iter_2``)."""
    return {f"{n}@{it}" for n in names for it in ITERATIONS}


def test_outputs_and_schema(project):
    train = pq.read_table(project / "data/prompts/train.parquet")
    val = pq.read_table(project / "data/prompts/val.parquet")
    test = pq.read_table(project / "data/prompts/test.parquet")
    assert (train.num_rows, val.num_rows, test.num_rows) == (12, 4, 4)
    assert {"prompt_id", "prompt", "key", "instruction_id_list", "kwargs"} <= set(train.column_names)
    held_out = set(val.column("prompt_id").to_pylist()) | set(test.column("prompt_id").to_pylist())
    seen = []
    for it in ITERATIONS:
        gens = pq.read_table(project / f"data/{it}/generations.parquet")
        assert gens.schema == GENERATIONS_SCHEMA
        assert gens.num_rows == 4 * 4  # data.prompts_per_iteration x generate.num_responses
        ids = set(gens.column("prompt_id").to_pylist())
        assert ids <= set(train.column("prompt_id").to_pylist()) and not ids & held_out
        seen.append(ids)
        metrics = json.loads((project / f"metrics/{it}/generate.json").read_text())
        assert metrics["responses"] == 16 and metrics["tokens_generated"] == sum(gens.column("num_tokens").to_pylist())
        assert 0 <= metrics["truncated_share"] <= 1 and metrics["dtype"] == "float32"
        scores = pq.read_table(project / f"data/{it}/scores.parquet")
        assert scores.num_rows == 16
        assert {"reward", "reward_ifeval", "ifeval_strict", "reward_sequence_classification"} <= set(scores.column_names)
        pairs = pq.read_table(project / f"data/{it}/pairs.parquet")
        counts = json.loads((project / f"metrics/{it}/pairs.json").read_text())
        assert pairs.num_rows == counts["pairs_out"] >= 2 and counts["prompts_in"] == 4
        assert all(c > r for c, r in zip(pairs.column("chosen_reward").to_pylist(),
                                          pairs.column("rejected_reward").to_pylist()))
        ref = pq.read_table(project / f"data/{it}/ref_logprobs.parquet")
        assert ref.column("prompt_id").to_pylist() == pairs.column("prompt_id").to_pylist()
        assert all(v < 0 for c in ("chosen_logprob", "rejected_logprob") for v in ref.column(c).to_pylist())
        metrics = json.loads((project / f"metrics/{it}/train.json").read_text())
        assert metrics["updates"] == pairs.num_rows // 2 and metrics["resumed_from_update"] == 0
        assert metrics["objective"] == "rebel" and metrics["iteration"] == it
        assert (project / f"metrics/train_log/{it}.tsv").read_text().count("\n") == metrics["updates"] + 1
    assert not seen[0] & seen[1]  # each iteration its own prompts
    # iteration 2 sampled from, and regressed against, iteration 1's policy
    ref2 = json.loads((project / "metrics/iter_2/ref_logprobs.json").read_text())
    assert ref2["reference"] == "previous" and ref2["reference_policy"] == "models/iter_1"
    assert set(lock_md5s(project)) == {
        "models/base", "data/prompts/train.parquet", "data/prompts/val.parquet", "data/prompts/test.parquet",
        *(f"data/{it}/{f}.parquet" for it in ITERATIONS for f in ("generations", "scores", "pairs", "ref_logprobs")),
        *(f"models/{it}" for it in ITERATIONS), *(f"data/eval/{n}.parquet" for n in ("base", *ITERATIONS, "test")),
        "data/benchmark/base.parquet", "data/benchmark/final.parquet"}
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(project / "models/iter_2").config.num_hidden_layers == 2
    # No temporary leftovers beside the outputs, no training checkpoints left.
    assert not [p for p in (project / "data").rglob(".*tmp-*")] and not (project / "models/.checkpoints").exists()


def test_evaluate_outputs_are_consistent(project):
    base = pq.read_table(project / "data/eval/base.parquet")
    assert sorted(set(base.column("split").to_pylist())) == ["test", "val"] and base.num_rows == (4 + 4) * 2
    m = json.loads((project / "metrics/eval.json").read_text())
    assert list(m["validation"]) == list(ITERATIONS) and m["test"]["iteration"] == "iter_2"
    for split, table_path, metrics in (("val", "data/eval/iter_1.parquet", "metrics/eval/iter_1.json"),
                                       ("test", "data/eval/test.parquet", "metrics/eval.json")):
        table = pq.read_table(project / table_path)
        ids = sorted(pq.read_table(project / f"data/prompts/{split}.parquet").column("prompt_id").to_pylist())
        assert table.num_rows == 4 * 2 and sorted(set(table.column("prompt_id").to_pylist())) == ids
        # The same seed per response for both policies (a paired comparison).
        assert table.column("base_seed").to_pylist() == table.column("trained_seed").to_pylist()
        e = json.loads((project / metrics).read_text())
        e = e["test"] if split == "test" else e
        assert e["prompts"] == 4 and e["responses_per_prompt"] == 2
        for name in ("base", "trained"):
            rewards = table.column(f"{name}_reward").to_pylist()
            assert e[name]["reward_mean"] == pytest.approx(sum(rewards) / len(rewards), abs=1e-6)
            assert e[name]["mean_response_tokens"] == pytest.approx(
                sum(table.column(f"{name}_num_tokens").to_pylist()) / 8, abs=1e-6)
            for key in ("ifeval_prompt_accuracy_loose", "ifeval_prompt_accuracy_strict",
                        "ifeval_instruction_accuracy_loose", "ifeval_instruction_accuracy_strict"):
                assert 0 <= e[name][key] <= 1
        r, w = e["reward"], e["win_rate"]
        assert r["diff"] == pytest.approx(r["trained"] - r["base"], abs=1e-5)
        assert r["diff_ci_low"] <= r["diff"] <= r["diff_ci_high"]
        assert 0 <= w["ci_low"] <= w["value"] <= w["ci_high"] <= 1
        assert w["wins"] + w["ties"] + w["losses"] == 4
        kl, log_ratio = table.column("kl").to_pylist(), table.column("kl_log_ratio").to_pylist()
        assert e["kl"]["mean"] == pytest.approx(sum(kl) / len(kl), abs=1e-5) and min(kl) >= 0
        assert e["kl"]["log_ratio_mean"] == pytest.approx(sum(log_ratio) / len(log_ratio), abs=1e-5)
    # The validation table: one row per iteration (0 = base) in the plots file and in eval.json.
    lines = (project / "metrics/eval_iterations.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:2] == ["iteration", "reward_diff"] and [ln.split("\t")[0] for ln in lines[1:]] == ["0", "1", "2"]
    it1 = json.loads((project / "metrics/eval/iter_1.json").read_text())
    row1 = dict(zip(header, lines[2].split("\t")))
    assert float(row1["reward_diff"]) == pytest.approx(it1["reward"]["diff"], abs=1e-5)
    assert m["validation"]["iter_1"]["kl_mean"] == it1["kl"]["mean"]
    hist = (project / "metrics/eval_reward_hist.tsv").read_text().splitlines()
    assert hist[0] == "reward\tbase\ttrained"
    assert sum(int(line.split("\t")[1]) for line in hist[1:]) == 8


def test_benchmark_outputs_are_consistent(project):
    """The IFEval benchmark stages: π0 once, the last iteration against it, paired over the same
    prompts (a seeded subset of 6 here), one greedy response each; the figures recomputed from the table."""
    from rlhf_pipeline.benchmark import FIGURES, scores, side_of

    base = pq.read_table(project / "data/benchmark/base.parquet")
    final = pq.read_table(project / "data/benchmark/final.parquet")
    m = json.loads((project / "metrics/benchmark/final.json").read_text())
    b = json.loads((project / "metrics/benchmark/base.json").read_text())
    assert base.num_rows == final.num_rows == m["prompts"] == b["prompts"] == 6
    assert m["policy"] == "iter_2" and m["max_new_tokens"] == b["max_new_tokens"] == 8
    assert sorted(base.column("prompt_id").to_pylist()) == final.column("prompt_id").to_pylist()
    assert final.column("base_response").to_pylist() == base.sort_by("prompt_id").column("response").to_pylist()
    assert set(base.column("seed").to_pylist()) and all(f in ("stop", "length") for f in base.column("finish_reason").to_pylist())
    assert sorted(m["ifeval"]) == sorted(FIGURES)
    for policy in ("base", "trained"):
        want = scores(side_of(final, policy))
        for name in FIGURES:
            assert m["ifeval"][name][policy] == pytest.approx(want[name], abs=1e-6)
        assert m[policy]["mean_response_tokens"] == pytest.approx(
            sum(final.column(f"{policy}_num_tokens").to_pylist()) / 6, abs=1e-6)
    for name in FIGURES:
        assert b[name] == pytest.approx(m["ifeval"][name]["base"], abs=1e-6)
        f = m["ifeval"][name]
        assert f["diff"] == pytest.approx(f["trained"] - f["base"], abs=1e-6) and f["ci_low"] <= f["ci_high"]
    assert b["truncated_share"] == m["base"]["truncated_share"] and "kl" not in m  # KL: the evaluation stages'
    assert not [c for c in final.column_names if c.startswith("kl")]


def test_report_logs_a_parent_run_and_a_child_run_per_iteration(project):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rlhf-pipeline")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the model-training view
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    run = parents[0]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
    assert sorted(children) == list(ITERATIONS) and len(runs) == 3
    assert run.data.params["train.objective.eta"] == "1.0" and run.data.params["seed"] == "7"
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert run.data.metrics["evaluate.test.win_rate.value"] == pytest.approx(evaluation["test"]["win_rate"]["value"])
    # the headline: the benchmark's figures and intervals, unprefixed
    bench = json.loads((project / "metrics/benchmark/final.json").read_text())
    for key in ("diff", "ci_low", "ci_high", "base", "trained"):
        assert run.data.metrics[f"ifeval.instruction_level_loose.{key}"] == pytest.approx(
            bench["ifeval"]["instruction_level_loose"][key])
    assert run.data.metrics["evaluate.test.kl.mean"] == pytest.approx(evaluation["test"]["kl"]["mean"])
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["git_commit"] == commit
    md5s = lock_md5s(project)
    assert run.data.tags["dvc.md5.data/iter_1/pairs.parquet"] == md5s["data/iter_1/pairs.parquet"]
    for it in ITERATIONS:
        child = children[it]
        assert child.data.metrics["pairs.pairs_out"] == json.loads(
            (project / f"metrics/{it}/pairs.json").read_text())["pairs_out"]
        assert child.data.params["seed"] == "7"
        history = client.get_metric_history(child.info.run_id, "train_log.loss")
        updates = json.loads((project / f"metrics/{it}/train.json").read_text())["updates"]
        assert sorted(h.step for h in history) == list(range(1, updates + 1))
    # The per-iteration validation curve, step = iteration (0 = base), as the MLflow UI draws it.
    curve = client.get_metric_history(run.info.run_id, "validation.reward_diff")
    assert sorted(h.step for h in curve) == [0, 1, 2]
    assert {h.step: h.value for h in curve}[2] == pytest.approx(evaluation["validation"]["iter_2"]["reward_diff"])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test.parquet", "params.yaml", "dvc.lock", "plots", "benchmark_comparison.json",
            "benchmark_examples.md"} <= artifacts
    (project / "dl").mkdir(exist_ok=True)
    local = client.download_artifacts(run.info.run_id, "benchmark_comparison.json", str(project / "dl"))
    table = json.loads(open(local, encoding="utf-8").read())
    assert len(table["data"]) == 6 and "trained_response" in table["columns"]
    # the inputs, digest = DVC md5; the final policy as a logged model that names its DVC path and md5
    inputs = {d.dataset.name: d for d in client.get_run(run.info.run_id).inputs.dataset_inputs}
    assert inputs["prompts/train"].dataset.digest == md5s["data/prompts/train.parquet"]
    assert {t.value for t in inputs["prompts/val"].tags} == {"validation"}
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    assert [(m.name, m.tags["dvc.path"], m.tags["dvc.md5"], m.source_run_id) for m in models] == [
        ("policy-iter_2", "models/iter_2", md5s["models/iter_2"], run.info.run_id)]


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
    from test_dvc_deps import stage_argv

    env = stage_env()
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "stages.report", *stage_argv("report")], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def test_report_to_a_real_mlflow_server(project, mlflow_server):
    from mlflow.tracking import MlflowClient

    proc = run_report(project, mlflow_server)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and len(runs) == 1 + len(ITERATIONS)
    run = parents[0]
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert run.data.params["train.learning_rate"] == str(params["train"]["learning_rate"])
    assert run.data.params["evaluate.num_responses"] == "2"
    evaluation = json.loads((project / "metrics/eval.json").read_text())
    assert run.data.metrics["evaluate.test.reward.diff"] == pytest.approx(evaluation["test"]["reward"]["diff"])
    child = next(r for r in runs if r.info.run_name == "iter_1")
    assert child.data.metrics["train.updates"] == json.loads(
        (project / "metrics/iter_1/train.json").read_text())["updates"]
    assert run.data.tags["dvc.md5.models/iter_2"] == lock_md5s(project)["models/iter_2"]
    assert len(run.data.tags["git_commit"]) == 40
    assert "test.parquet" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_unreachable_explicit_server_is_a_clear_error(project):
    before = lock_md5s(project)
    proc = run_report(project, f"http://127.0.0.1:{free_port()}")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: MLFLOW_TRACKING_URI=http://127.0.0.1:") and "does not answer" in last
    assert "Traceback" not in proc.stderr
    assert lock_md5s(project) == before and (project / "data/eval/test.parquet").is_file()


def test_params_read_match_dvc_yaml(project, tmp_path, monkeypatch):
    """Each resolved stage's `main` (every foreach item), run with its dvc.yaml command line in a
    copy of the tiny project with a params object that records every field read, reads exactly the
    params keys its dvc.yaml entry declares."""
    import importlib
    import shutil

    from test_dvc_deps import STAGES, ParamsRecorder, check_params_read, stage_argv, stage_module

    from rlhf_pipeline.params import load_params

    copy = tmp_path / "proj"
    shutil.copytree(project, copy, symlinks=True)
    monkeypatch.chdir(copy)
    reports = ("report", "online_report")
    assert all(STAGES[r]["params"] == [None] for r in reports)  # the whole file: they log every key
    for stage in STAGES:
        if stage in reports:
            continue
        module = importlib.import_module(stage_module(stage))
        params = load_params()
        recorder = ParamsRecorder(params)
        monkeypatch.setattr(module, "load_params", lambda r=recorder: r)
        module.main(stage_argv(stage))
        check_params_read(stage, recorder.leaves(), params)
    # the tiny project reads IFEval's prompts; the default source reads its own section too
    params = yaml.safe_load((copy / "params.yaml").read_text())
    params["data"]["source"] = "ifeval_constraints"
    (copy / "params.yaml").write_text(yaml.safe_dump(params))
    module = importlib.import_module(stage_module("prepare_prompts"))
    params = load_params()
    recorder = ParamsRecorder(params)
    monkeypatch.setattr(module, "load_params", lambda r=recorder: r)
    module.main(stage_argv("prepare_prompts"))
    assert any(k.startswith("data.constraints") for k in recorder.leaves())
    check_params_read("prepare_prompts", recorder.leaves(), params)


def test_second_repro_runs_nothing(project):
    """(Byte-identical forced reruns: tests/test_reproducibility.py, which reruns every stage.)"""
    assert "Running stage" not in run_dvc(project, "repro").stdout


def test_editing_another_objective_leaves_the_pipeline_up_to_date(project):
    """The tiny project trains REBEL: its stages depend on the chosen objective's file only
    (stages/dag.py's template), so an edit of dpo.py stales nothing, and one of rebel.py stales
    prepare_prompts (which checks the objective's keys) and train."""
    for name, stale in (("dpo", set()), ("rebel", {"prepare_prompts", *stages_of("train")})):
        path = project / f"rlhf_pipeline/objectives/{name}.py"
        original = path.read_text(encoding="utf-8")
        path.write_text(original + "\n# an edit\n", encoding="utf-8")
        try:
            status = json.loads(run_dvc(project, "status", "--json", "dvc.yaml").stdout or "{}")
        finally:
            path.write_text(original, encoding="utf-8")
        assert {key.rsplit(":", 1)[-1] for key in status} == stale, (name, sorted(status))
    assert "Running stage" not in run_dvc(project, "repro").stdout


def test_changed_min_reward_gap_reruns_pairs_only(project):
    before = lock_md5s(project)
    set_param(project, "pairs", "min_reward_gap", 1e-4)
    # the rest runs only if a pairs file changed (DVC compares the new pairs' hash)
    assert {s for s in ran(run_dvc(project, "repro").stdout) if s.startswith("pairs@")} == stages_of("pairs")
    assert not ran(run_dvc(project, "repro").stdout)
    after = lock_md5s(project)
    assert not {k for k in before if before[k] != after[k]} & {
        "models/base", "data/prompts/train.parquet", "data/iter_1/generations.parquet", "data/eval/base.parquet"}


def test_changed_eta_reruns_iteration_1_train_and_everything_after_it(project):
    """η changes π_2, which iteration 2 samples from: all of iteration 2 reruns; the base policy's
    evaluation and iteration 1's data do not. prepare_prompts reruns too (it checks the objective's
    keys) and writes the same prompts, so nothing reruns for it."""
    before = lock_md5s(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["objective"]["eta"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran(run_dvc(project, "repro").stdout) == {
        "prepare_prompts", "train@iter_1", *stages_of("evaluate"), "generate@iter_2", "score@iter_2", "pairs@iter_2",
        "ref_logprobs@iter_2", "train@iter_2", "evaluate_test", "benchmark", "report"}
    after = lock_md5s(project)
    changed = {k for k in before if before[k] != after[k]}
    assert {"models/iter_1", "data/iter_2/generations.parquet", "models/iter_2"} <= changed
    assert not changed & {"data/iter_1/pairs.parquet", "data/iter_1/ref_logprobs.parquet", "data/eval/base.parquet"}


def test_a_third_iteration_reruns_only_itself_and_what_reads_it(project, tmp_path):
    project = copy_project(project, tmp_path / "proj")  # the tests after this one keep two iterations
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["iterations"]["iter_3"] = {"prev": "iter_2"}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    before = lock_md5s(project)
    # prepare_prompts checks that every iteration's prompts exist (before any iteration runs): it reruns,
    # writes the same prompt files, and nothing of iterations 1-2 reruns
    assert ran(run_dvc(project, "repro").stdout) == {
        "prepare_prompts", "generate@iter_3", "score@iter_3", "pairs@iter_3", "ref_logprobs@iter_3", "train@iter_3",
        "evaluate@iter_3", "evaluate_test", "benchmark", "report"}
    after = lock_md5s(project)
    assert all(after[k] == v for k, v in before.items() if k not in ("data/eval/test.parquet",
                                                                     "data/benchmark/final.parquet"))
    assert json.loads((project / "metrics/benchmark/final.json").read_text())["policy"] == "iter_3"
    assert json.loads((project / "metrics/eval.json").read_text())["test"]["iteration"] == "iter_3"
    assert (project / "metrics/eval_iterations.tsv").read_text().count("\n") == 1 + 4  # base + 3 iterations
    third = set(pq.read_table(project / "data/iter_3/generations.parquet").column("prompt_id").to_pylist())
    for it in ITERATIONS:
        assert not third & set(pq.read_table(project / f"data/{it}/generations.parquet").column("prompt_id").to_pylist())


def test_reference_base_reruns_the_reference_log_probs_and_what_they_change(project):
    """With train.reference: base, iteration 1's reference is π0 as before (same file, so its
    training does not rerun); iteration 2 now regresses against π0 instead of π_2."""
    set_param(project, "train", "reference", "base")
    assert ran(run_dvc(project, "repro").stdout) == {
        *stages_of("ref_logprobs"), "train@iter_2", "evaluate@iter_2", "evaluate_test", "benchmark", "report"}
    ref2 = json.loads((project / "metrics/iter_2/ref_logprobs.json").read_text())
    assert ref2["reference"] == "base" and ref2["reference_policy"] == "models/base"


def test_changed_log_prob_temperature_reruns_ref_logprobs_and_train(project):
    set_param(project, "train", "allow_temperature_mismatch", True)  # read by no stage but report (logs every key)
    assert ran(run_dvc(project, "repro").stdout) == {"report"}
    set_param(project, "train", "temperature", 1.0)  # generate.temperature is 0.8: new log-probs
    assert ran(run_dvc(project, "repro", "train@iter_1").stdout) == {"ref_logprobs@iter_1", "train@iter_1"}
    stale = set(json.loads(run_dvc(project, "status", "--json").stdout))
    assert {"ref_logprobs@iter_2", "train@iter_2"} <= stale  # they read train.temperature too
    assert not stale & {"generate@iter_1", "evaluate_base", "prepare_prompts"}


def test_missing_eos_penalty_reruns_score_and_shapes_only_the_training_reward(project):
    before = pq.read_table(project / "data/iter_1/scores.parquet").column("reward").to_pylist()
    old_penalty = yaml.safe_load((project / "params.yaml").read_text())["reward"].get("missing_eos_penalty") or 0.0
    set_param(project, "reward", "missing_eos_penalty", 0.25)
    # iteration 1's pairs only (the propagation to training and iteration 2 is the η test's)
    assert ran(run_dvc(project, "repro", "pairs@iter_1").stdout) == {"score@iter_1", "pairs@iter_1"}
    assert {"score@iter_2", "evaluate_base"} & set(json.loads(run_dvc(project, "status", "--json").stdout)) == {
        "score@iter_2"}
    gens = pq.read_table(project / "data/iter_1/generations.parquet").sort_by([("prompt_id", "ascending"),
                                                                                ("response_idx", "ascending")])
    scores = pq.read_table(project / "data/iter_1/scores.parquet")
    missing = [f == "length" for f in gens.column("finish_reason").to_pylist()]
    assert scores.column("missing_eos").to_pylist() == missing and any(missing)
    assert scores.column("reward").to_pylist() == pytest.approx(
        [r + (old_penalty - 0.25) * m for r, m in zip(before, missing)])
    metrics = json.loads((project / "metrics/iter_1/score.json").read_text())
    assert metrics["missing_eos_share"] == pytest.approx(sum(missing) / len(missing))
    # evaluation scores with the scorers only, and does not depend on the penalty
    assert not [c for c in pq.read_table(project / "data/eval/test.parquet").column_names if "missing_eos" in c]
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    evaluate_params = lock["stages"]["evaluate_base"]["params"]["params.yaml"]
    assert "reward.scorers" in evaluate_params and "missing_eos_penalty" not in str(evaluate_params)
    assert lock["stages"]["score@iter_1"]["params"]["params.yaml"]["reward"]["missing_eos_penalty"] == 0.25


def test_bad_params_fail_before_any_output(project):
    from test_dvc_deps import stage_argv

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["generate"]["top_p"] = 0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.generate", *stage_argv("generate@iter_1")], cwd=project,
                          env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: params.yaml: generate.top_p:")
    assert "Traceback" not in proc.stderr


def test_classic_variant_runs_sft_the_reward_model_and_rl_against_it_apart_from_the_default(tiny_project, tmp_path):
    """`dvc repro classic/dvc.yaml` runs SFT, the SFT policy's evaluation, the reward model and a
    REBEL iteration from the SFT policy scored by that reward model, on the default DAG's outputs
    (up to date, so not rerun); reruns are stale-only and byte-identical, and the default
    pipeline's status is untouched."""
    project = copy_project(tiny_project, tmp_path / "proj")
    sft, evaluate, rm = "classic/dvc.yaml:sft", "classic/dvc.yaml:evaluate_sft", "classic/dvc.yaml:reward_model"
    rl = {f"classic/dvc.yaml:{s}" for s in ("rl_generate", "rl_score", "rl_pairs", "rl_ref_logprobs", "rl_train",
                                            "evaluate_rl", "overoptimization")}
    scored_by_rm = rl - {"classic/dvc.yaml:rl_generate"}
    assert ran(run_dvc(project, "repro", "classic/dvc.yaml").stdout) == {sft, evaluate, rm, *rl}
    metrics = json.loads((project / "classic/metrics/sft.json").read_text())
    assert (metrics["train_demonstrations"], metrics["val_demonstrations"], metrics["updates"]) == (16, 4, 8)
    assert metrics["objective"] == "sft" and metrics["val_loss_after"] < metrics["val_loss_before"]
    log = (project / "classic/metrics/train_log/sft.tsv").read_text().splitlines()
    assert len(log) == 1 + 8
    evaluation = json.loads((project / "classic/metrics/eval/sft.json").read_text())
    assert evaluation["policy"] == "classic/models/sft" and evaluation["split"] == "val"
    assert not (project / "classic/models/.checkpoints/sft").exists()
    reward = json.loads((project / "classic/metrics/reward_model.json").read_text())
    assert reward["objective"] == "bradley_terry" and reward["val_prompts"] == 1 and reward["train_pairs"] >= 6
    assert reward["val_after"]["pairs"] == reward["val_pairs"] >= 2 and len(reward["val_after"]["calibration"]) == 2
    assert (project / "classic/models/reward/config.json").is_file()
    score = json.loads((project / "classic/metrics/rl/score.json").read_text())
    assert score["reward_model"] == "classic/models/reward" and score["agreement_ifeval_pairs"] >= 0
    scores = pq.read_table(project / "classic/data/rl/scores.parquet")
    assert {"reward_sequence_classification", "reward_ifeval"} <= set(scores.column_names)
    generate = json.loads((project / "classic/metrics/rl/generate.json").read_text())
    assert generate["iteration"] == 2  # iteration 2's prompts: not those the reward model trained on
    assert json.loads((project / "classic/metrics/rl/train.json").read_text())["objective"] == "rebel"
    assert json.loads((project / "classic/metrics/eval/rl.json").read_text())["policy"] == "classic/models/rl"
    overoptimization = json.loads((project / "classic/metrics/overoptimization.json").read_text())
    for policy in ("sft", "rebel_learned_reward", "rebel_ifeval"):
        assert overoptimization[policy]["responses"] == 8 and overoptimization[policy]["kl"] is not None
        assert {"proxy_gain", "gold_gain", "agreement_pairwise_accuracy"} <= set(overoptimization[policy])

    def classic_md5s():
        lock = yaml.safe_load((project / "classic/dvc.lock").read_text())
        return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st["outs"]
                if not o["path"].startswith("classic/metrics/")}

    before = classic_md5s()
    assert not ran(run_dvc(project, "repro", "classic/dvc.yaml").stdout)
    assert ran(run_dvc(project, "repro", "--force", "--single-item", sft).stdout) == {sft}
    assert classic_md5s() == before  # byte-identical rerun
    assert json.loads(run_dvc(project, "status", "--json", "dvc.yaml").stdout) == {}
    set_param(project, "reward_model", "learning_rate", 5e-4)  # the reward model and what it scores
    assert ran(run_dvc(project, "repro", "classic/dvc.yaml").stdout) == {rm, *scored_by_rm}
    # of the default pipeline only report, which logs every key of params.yaml to MLflow, is stale
    assert set(json.loads(run_dvc(project, "status", "--json", "dvc.yaml").stdout)) == {"report"}
    # LoRA on the three trainers: each saves its merged weights and adapter, and what starts from them
    # reruns: an SFT change reruns every classic stage (all start from the SFT policy)
    for section in ("sft", "reward_model", "train"):
        set_param(project, section, "lora", {"r": 4, "alpha": 8, "dropout": 0.1})
    first, *later = sorted(yaml.safe_load((project / "params.yaml").read_text())["iterations"])
    # overoptimization compares against the default pipeline's first REBEL policy: rebuilt with LoRA too
    assert ran(run_dvc(project, "repro", "classic/dvc.yaml").stdout) == {sft, evaluate, rm, *rl, f"train@{first}",
                                                                         f"evaluate@{first}"}
    for model in ("sft", "reward", "rl"):
        assert (project / f"classic/models/{model}/adapter/adapter_model.safetensors").is_file()
        assert (project / f"classic/models/{model}/model.safetensors").is_file()
    assert json.loads((project / "classic/metrics/rl/train.json").read_text())["trainable_parameters"] < 10 ** 5
    assert classic_md5s()["classic/models/sft"] != before["classic/models/sft"]
    assert {"report", *(f"train@{k}" for k in later)} <= set(json.loads(run_dvc(project, "status", "--json",
                                                                             "dvc.yaml").stdout))


def test_online_variant_trains_evaluates_and_reports_each_algorithm(tiny_project, tmp_path):
    """`dvc repro online/dvc.yaml` trains PPO, GRPO and online REBEL from the base policy, evaluates
    each against it on validation and test, and logs one MLflow run with their curves and the offline
    REBEL's evaluation; a change to one algorithm's params reruns that algorithm only."""
    from mlflow.tracking import MlflowClient

    project = copy_project(tiny_project, tmp_path / "proj")
    keys = ("grpo", "ppo", "rebel")
    stages = {f"online/dvc.yaml:{s}@{k}" for s in ("online_train", "online_evaluate") for k in keys}
    report = "online/dvc.yaml:online_report"
    assert ran(run_dvc(project, "repro", "online/dvc.yaml").stdout) == {*stages, report}
    for key in keys:
        train = json.loads((project / f"online/metrics/{key}/train.json").read_text())
        assert train["algorithm"] == key and train["responses_generated"] == 2 * 2 * 2
        assert train["updates"] == (2 if key == "rebel" else 4) * 2 and train["resumed_from_update"] == 0
        rollouts = pq.read_table(project / f"online/data/{key}/rollouts.parquet")
        assert rollouts.column("step").to_pylist() == [0] * 4 + [1] * 4
        evaluation = json.loads((project / f"online/metrics/eval/{key}.json").read_text())
        assert evaluation["policy"] == f"online/models/{key}"
        assert evaluation["val"]["prompts"] == evaluation["test"]["prompts"] == 4
        assert {"diff", "diff_ci_low", "diff_ci_high"} <= set(evaluation["test"]["reward"])
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id],
                              "params.`online.rollout_steps` = '2'", order_by=["attributes.start_time DESC"])
    run = next(r for r in runs if "offline.evaluate.test.reward.diff" in r.data.metrics)  # the parent
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id}
    assert sorted(children) == list(keys)
    assert children["ppo"].data.metrics["evaluate.test.reward.diff"] == pytest.approx(
        json.loads((project / "online/metrics/eval/ppo.json").read_text())["test"]["reward"]["diff"])
    history = client.get_metric_history(children["grpo"].info.run_id, "train_log.reward")
    assert sorted(h.step for h in history) == list(range(1, 9))
    assert not ran(run_dvc(project, "repro", "online/dvc.yaml").stdout)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["online"]["algorithms"]["ppo"]["kl_coef"] = 1.0
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = ran(run_dvc(project, "repro", "online/dvc.yaml").stdout)  # evaluate too if the weights changed
    assert "online/dvc.yaml:online_train@ppo" in rerun
    assert rerun <= {"online/dvc.yaml:online_train@ppo", "online/dvc.yaml:online_evaluate@ppo", report}
    # the default pipeline is untouched, but for report, which logs every params key
    assert ran(run_dvc(project, "repro").stdout) <= {"report"}
