"""The reproducibility guarantees of docs/reproducibility.md, each a test on the tiny
config (stale-only reruns of params changes are in tests/test_pipeline_dvc.py; exact dvc.yaml
dependencies in tests/test_dvc_deps.py).

Faults (a SIGKILL half-way through writing an output, a non-deterministic writer) are injected
into one stage's process by tests/fault_injection/sitecustomize.py, put on PYTHONPATH.
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_project, lock_md5s, ran, run_dvc, set_param, stage_env

pytestmark = pytest.mark.slow

FAULTS = REPO / "tests" / "fault_injection"


def fault_env(fault: str, stage: str, path_part: str = "") -> dict[str, str]:
    env = stage_env()
    env.update(PYTHONPATH=str(FAULTS), RLHF_FAULT=fault, RLHF_FAULT_STAGE=f"stages.{stage}",
               RLHF_FAULT_PATH=path_part)
    return env


def dvc(project: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env or stage_env(),
                          capture_output=True, text=True)


def stale_stages(project: Path, dvcfile: str = "dvc.yaml") -> set[str]:
    """Stale stages of one pipeline file (the default one unless named)."""
    return set(json.loads(run_dvc(project, "status", "--json", dvcfile).stdout))


@pytest.mark.parametrize("module", ["rlhf_pipeline/losses.py", "rlhf_pipeline/evaluation.py"])
def test_edited_library_module_reruns_exactly_its_stages(tiny_project, tmp_path, module):
    """Stages whose deps list the module rerun; their outputs come out identical, so no stage
    downstream reruns, except report (its inputs include every stage's metrics, which hold timings)."""
    proj = copy_project(tiny_project, tmp_path / "proj")
    before = lock_md5s(proj)
    with open(proj / module, "a") as f:
        f.write("\n# an edit that changes no behaviour\n")
    from test_dvc_deps import resolved_stages

    dependents = {s for s, d in resolved_stages(proj).items() if module in d["deps"] and d["file"] == "dvc.yaml"}
    assert dependents  # the module is some stage's code
    assert ran(run_dvc(proj, "repro").stdout) == dependents | {"report"}
    assert lock_md5s(proj) == before


@pytest.mark.ci_only  # the whole tiny DAG rerun from scratch: .ci/run (make test-ci), not make test
def test_check_repro_passes_on_a_deterministic_pipeline(tiny_project, tmp_path):
    """`make check-repro` reruns everything in a scratch clone: identical hashes for every data and
    model output (two clones, same machine)."""
    proj = copy_project(tiny_project, tmp_path / "proj")
    cmd = [sys.executable, "-m", "rlhf_pipeline.repro_check"]
    ok = subprocess.run(cmd, cwd=proj, env=stage_env(), capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"all {len(lock_md5s(proj))} data and model outputs are byte-identical" in ok.stdout


@pytest.mark.ci_only  # the whole tiny DAG twice: .ci/run (make test-ci), not make test
def test_check_repro_ci_profile_runs_twice_and_names_the_first_difference(tiny_project, tmp_path,
                                                                          raw_tiny_model_dir, tiny_reward_model_dir):
    """`make check-repro-ci`: the iterated DAG on a small profile, twice from scratch in a scratch
    clone; with a writer made non-deterministic in `pairs` it fails naming `pairs@iter_1` and its
    file, and its Markdown summary holds the table and the params/metrics diff against a revision."""
    from conftest import TINY_MODEL, tiny_overrides

    proj = copy_project(tiny_project, tmp_path / "proj")
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(tiny_overrides(TINY_MODEL, tiny_reward_model_dir)))
    summary = tmp_path / "summary.md"
    cmd = [sys.executable, "-m", "rlhf_pipeline.repro_check", "--profile", str(profile), "--against", "HEAD",
           "--summary", str(summary)]
    bad = subprocess.run(cmd, cwd=proj, env=fault_env("nondeterministic-parquet", "pairs"), capture_output=True,
                         text=True)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "first difference in stage 'pairs@iter_1', file data/iter_1/pairs.parquet" in bad.stdout
    assert "2 output(s) differ" in bad.stdout  # the two pairs files: their content is the same, so all after is too
    text = summary.read_text()
    assert "| pairs@iter_1 | `data/iter_1/pairs.parquet` | DIFFERS |" in text
    assert "| train@iter_2 | `models/iter_2` | same |" in text
    assert "## Params changed against `HEAD`" in text and "## Metrics changed against `HEAD`" in text
    broken = tmp_path / "broken.yaml"
    broken.write_text("generate: {top_p: 0}\n")
    proc = subprocess.run([*cmd[:3], "--profile", str(broken)], cwd=proj, env=stage_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "generate.top_p" in proc.stderr  # before any run


def test_check_repro_refuses_a_stale_workspace(tiny_project, tmp_path):
    proj = copy_project(tiny_project, tmp_path / "proj")
    set_param(proj, "train", "learning_rate", 3e-4)
    proc = subprocess.run([sys.executable, "-m", "rlhf_pipeline.repro_check"], cwd=proj, env=stage_env(),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "stale stages" in proc.stderr


def test_queued_experiments_land_in_dvc_exp_show_and_mlflow(tiny_project, tmp_path):
    from mlflow.tracking import MlflowClient

    proj = copy_project(tiny_project, tmp_path / "proj")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["add", "-A"], cwd=proj, check=True)
    subprocess.run(git + ["commit", "-qm", "baseline run"], cwd=proj, check=True)
    # The first experiment changes only the evaluation's intervals: the four stages that read them run.
    run_dvc(proj, "exp", "run", "--queue", "-n", "bootstrap-1k", "-S", "evaluate.bootstrap_samples=1000")
    run_dvc(proj, "exp", "run", "--queue", "-n", "eta-two-lr", "-S", "train.objective.eta=2.0", "-S", "train.learning_rate=5e-5",
            "-S", "train.mlflow_live=true")
    run_dvc(proj, "queue", "start", "-j", "1")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = run_dvc(proj, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"queued experiments did not finish: {status}")
    run_dvc(proj, "queue", "stop", check=False)
    assert "Failed" not in status, run_dvc(proj, "queue", "logs", "bootstrap-1k", check=False).stdout
    shown = json.loads(run_dvc(proj, "exp", "show", "--json").stdout)
    found = {}
    for entry in shown:
        for exp in entry.get("experiments") or []:
            rev = exp["revs"][0]
            found[exp.get("name") or rev.get("name")] = rev["data"]
    assert {"bootstrap-1k", "eta-two-lr"} <= set(found), json.dumps(shown)[:2000]
    assert found["bootstrap-1k"]["params"]["params.yaml"]["data"]["evaluate"]["bootstrap_samples"] == 1000
    for name, eta in (("bootstrap-1k", 1.0), ("eta-two-lr", 2.0)):
        data = found[name]
        assert data["params"]["params.yaml"]["data"]["train"]["objective"]["eta"] == eta
        metrics = data["metrics"]
        assert {"metrics/iter_2/train.json", "metrics/eval.json", "metrics/iter_1/pairs.json",
                "metrics/eval/iter_2.json"} <= set(metrics)
        assert 0 <= metrics["metrics/eval.json"]["data"]["test"]["win_rate"]["value"] <= 1
    # Each experiment is its own MLflow run in the project's store, tagged with its name.
    client = MlflowClient(tracking_uri=f"sqlite:///{proj / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("rlhf-pipeline").experiment_id])
    live = [r for r in runs if r.data.tags.get("rlhf.stage") == "train-live"]
    live_ids = {r.info.run_id for r in live}
    parents = [r for r in runs if r.info.run_id not in live_ids and "mlflow.parentRunId" not in r.data.tags]
    by_exp = {r.data.tags.get("dvc_exp_name"): r for r in parents}
    assert {"bootstrap-1k", "eta-two-lr"} <= set(by_exp) and len(parents) == len(by_exp)
    # each report's child runs (one per iteration) carry their experiment's name too
    children = {(r.data.tags.get("dvc_exp_name"), r.info.run_name): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents}}
    # train.mlflow_live streamed the second experiment's updates, one run per iteration's train stage.
    assert sorted((r.data.tags["dvc_exp_name"], r.data.params["iteration"]) for r in live) == [
        ("eta-two-lr", "iter_1"), ("eta-two-lr", "iter_2")]
    for run in live:
        updates = int(children[("eta-two-lr", run.data.params["iteration"])].data.metrics["train.updates"])
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_log.loss")]
        assert sorted(steps) == list(range(1, updates + 1))
    assert by_exp["bootstrap-1k"].data.params["evaluate.bootstrap_samples"] == "1000"
    assert by_exp["eta-two-lr"].data.params["train.learning_rate"] == "5e-05"


def test_outputs_round_trip_through_a_local_remote(tiny_project, tmp_path):
    proj = copy_project(tiny_project, tmp_path / "proj")
    remote = tmp_path / "remote"
    run_dvc(proj, "remote", "add", "--local", "-d", "store", str(remote))
    # Only the default pipeline ran here; a bare `dvc pull` would also ask for classic/dvc.yaml's outputs.
    run_dvc(proj, "push", "dvc.yaml")
    assert any(remote.rglob("*"))
    outputs = list(lock_md5s(proj))
    shutil.rmtree(proj / ".dvc" / "cache")
    for out in outputs:
        path = proj / out
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert stale_stages(proj)  # outputs gone: DVC says so
    run_dvc(proj, "pull", "dvc.yaml")
    assert all((proj / out).exists() for out in outputs)
    assert stale_stages(proj) == set()
    assert ran(run_dvc(proj, "repro").stdout) == set()


@pytest.mark.parametrize("stage,change,fault,output,path_part", [
    ("generate@iter_1", ("generate", "temperature", 0.7), "kill-writing-parquet", "data/iter_1/generations.parquet",
     "generations.parquet"),
    ("train@iter_1", ("train", "learning_rate", 3e-4), "kill-writing-safetensors", "models/iter_1", ".iter_1.tmp-"),
    ("classic/dvc.yaml:sft", ("sft", "learning_rate", 5e-4), "kill-writing-safetensors", "classic/models/sft",
     ".sft.tmp-"),
])
def test_sigkill_while_writing_leaves_no_partial_output(tiny_project, tmp_path, stage, change, fault, output,
                                                        path_part):
    proj = copy_project(tiny_project, tmp_path / "proj")
    set_param(proj, *change)
    dvcfile = stage.split(":")[0] if ":" in stage else "dvc.yaml"
    killed = dvc(proj, "repro", stage, env=fault_env(fault, stage.split(":")[-1].split("@")[0], path_part))
    assert killed.returncode != 0
    assert f"Running stage '{stage}'" in killed.stdout
    target = proj / output
    # The half-written file was a temporary beside the output, never the output itself.
    assert list(target.parent.glob(f".{target.name}.tmp-*")), "the fault did not fire mid-write"
    assert not target.exists()
    assert stage in stale_stages(proj, dvcfile)
    assert ran(run_dvc(proj, "repro", stage).stdout) == {stage}
    assert target.exists() and not list(target.parent.glob(f".{target.name}.tmp-*"))
    assert stage not in stale_stages(proj, dvcfile)
