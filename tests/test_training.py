"""The train stage on a tiny model: it learns, resumes after SIGKILL to the same weights, and
rejects bad input before training."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from conftest import REPO, stage_env
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.logprobs import pair_logprobs
from rlhf_pipeline.schemas import PAIRS as PAIRS_SCHEMA
from rlhf_pipeline.objectives import PairwiseTask, check_reference, make_objective
from rlhf_pipeline.params import TrainParams
from rlhf_pipeline.training import episode_order, train_policy

#: The train stage's command line in a stage_dir project (dvc.yaml passes the same options).
TRAIN = ["-m", "stages.train", "--iteration", "iter_1", "--policy", "models/base", "--pairs", "data/pairs.parquet",
         "--ref-logprobs", "data/ref_logprobs.parquet", "--out", "models/policy", "--metrics", "metrics/train.json",
         "--log", "metrics/train_log.tsv"]
CHECKPOINTS = "models/.checkpoints/policy"


def run_training(model_dir, pairs, ref, cfg, tmp_path, temperature=1.0, **kwargs):
    """train_policy on a PairwiseTask, as the train stage calls it."""
    from rlhf_pipeline.models import load_tokenizer

    task = PairwiseTask(pairs, ref, make_objective(cfg.objective), load_tokenizer(model_dir).pad_token_id,
                        temperature, "the pairs")
    return train_policy(model_dir, task, cfg, 0, tmp_path / "policy", tmp_path / "ckpt", "f", progress=False, **kwargs)


def synthetic_pairs(n=8):
    """Pairs whose chosen responses are one token pattern and rejected another."""
    rows = []
    for i in range(n):
        prompt = [1, 100 + i, 200 + i, 300]
        rows.append({"prompt_id": f"p{i:02d}", "prompt_ids": prompt, "chosen_ids": [500, 501, 502, 2],
                     "rejected_ids": [600 + i, 601, 2], "chosen": "c", "rejected": "r",
                     "chosen_reward": 1.0, "rejected_reward": 0.0, "chosen_response_idx": 0,
                     "rejected_response_idx": 1, "chosen_finish_reason": "stop", "rejected_finish_reason": "stop"})
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


def reference(model, tok, pairs):
    c, r = pair_logprobs(model, *(pairs.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids")),
                         tok.pad_token_id, 1.0, batch_size=8, progress=False)
    return pa.table({"prompt_id": pairs.column("prompt_id"), "chosen_logprob": c, "rejected_logprob": r})


@pytest.mark.parametrize("registry", ["OBJECTIVES", "ONLINE_ALGORITHMS"])
def test_each_builtin_plugin_file_registers_the_plugin_of_its_name(registry):
    from rlhf_pipeline import registry as registries
    from rlhf_pipeline.registry import plugin_name

    r = getattr(registries, registry)
    assert r.builtin_names() == (["dpo", "ipo", "rebel", "simpo"] if registry == "OBJECTIVES"
                                 else ["grpo", "ppo", "rebel", "rloo"])
    for name in r.builtin_names():
        cls = r.get(name, "test")
        assert cls.__module__ == f"{r.package}.{name}" and plugin_name(cls.Params) == name
        assert r.module_file(name).name == f"{name}.py"


@pytest.mark.parametrize("objective", [{"name": "rebel", "eta": 1.0}, {"name": "dpo"}, {"name": "ipo"},
                                       {"name": "simpo"}])
def test_policy_learns_to_prefer_chosen(tiny_policy, tiny_model_dir, tmp_path, objective):
    from rlhf_pipeline.models import load_policy

    model, tok = tiny_policy
    pairs = synthetic_pairs()
    ref = reference(model, tok, pairs)
    cfg = TrainParams(objective=objective, temperature=1.0, learning_rate=1e-3, epochs=6,
                      per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.0, save_every=100,
                      dtype="float32")
    streamed = []
    rows, summary = run_training(tiny_model_dir, pairs, ref, cfg, tmp_path, on_update=streamed.append)
    assert summary["updates"] == 12 and len(rows) == 12 and summary["batch_size"] == 4
    assert summary["objective"] == objective["name"]
    assert set(make_objective(cfg.objective).metric_names) <= set(rows[0])  # each objective logs its own figures
    assert streamed == rows  # what train.mlflow_live streams is the TSV log, update by update
    trained = load_policy(tmp_path / "policy", torch.float32, torch.device("cpu"))
    after = reference(trained, tok, pairs)
    margin_before = [c - r for c, r in zip(ref.column("chosen_logprob").to_pylist(), ref.column("rejected_logprob").to_pylist())]
    margin_after = [c - r for c, r in zip(after.column("chosen_logprob").to_pylist(), after.column("rejected_logprob").to_pylist())]
    assert all(a > b + 0.5 for a, b in zip(margin_after, margin_before)), (margin_before, margin_after)
    assert rows[0]["kl_chosen"] == pytest.approx(0.0, abs=1e-3)  # the policy starts as π0
    assert not (tmp_path / "ckpt").exists()


def test_reference_must_match_pairs():
    pairs = synthetic_pairs(3)
    ref = pa.table({"prompt_id": ["p00", "p02", "p01"], "chosen_logprob": [0.0] * 3, "rejected_logprob": [0.0] * 3})
    with pytest.raises(PipelineError, match=r"first difference at row 1\); rerun the ref_logprobs stage"):
        check_reference(pairs, ref, "x")
    with pytest.raises(PipelineError, match="the pairs file has no rows"):
        check_reference(pairs.slice(0, 0), ref.slice(0, 0), "x")


def test_too_few_episodes_for_a_batch(tiny_model_dir, tmp_path):
    pairs = synthetic_pairs(3)
    ref = pa.table({"prompt_id": pairs.column("prompt_id"), "chosen_logprob": [0.0] * 3, "rejected_logprob": [0.0] * 3})
    cfg = TrainParams(per_device_train_batch_size=4, gradient_accumulation_steps=1, dtype="float32")
    with pytest.raises(PipelineError, match="train.total_episodes: 3 episodes is less than one batch of 4"):
        run_training(tiny_model_dir, pairs, ref, cfg, tmp_path)


def test_episode_order_is_seeded_epochs_of_permutations():
    order = episode_order(5, 12, seed=3)
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:10]) == list(range(5)) and len(order) == 12
    assert order == episode_order(5, 12, seed=3) != episode_order(5, 12, seed=4)


def stage_dir(root, tiny_model_dir, tiny_policy, updates):
    """A project folder with models/base, pairs, reference log-probs and params for the train stage."""
    model, tok = tiny_policy
    shutil.copytree(tiny_model_dir, root / "models/base")
    (root / "data").mkdir(parents=True)
    pairs = synthetic_pairs()
    pq.write_table(pairs, root / "data/pairs.parquet")
    pq.write_table(reference(model, tok, pairs).cast(pa.schema([("prompt_id", pa.string()),
                   ("chosen_logprob", pa.float64()), ("rejected_logprob", pa.float64())])),
                   root / "data/ref_logprobs.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = 1
    params["train"].update(learning_rate=1e-4, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                           total_episodes=2 * updates, save_every=1, dtype="float32")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "stages").symlink_to(REPO / "stages")
    return root


def kill_at_first_checkpoint_then_resume(cmd: list[str], project, checkpoints: str = CHECKPOINTS,
                                        out: str = "models/policy") -> None:
    """Start a training stage in ``project``, SIGKILL it once its first checkpoint is in place
    (before its model ``out`` is written), then run it again to the end."""
    proc = subprocess.Popen(cmd, cwd=project, env=stage_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = project / checkpoints / "latest/fingerprint"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (project / out).exists()
    subprocess.run(cmd, cwd=project, env=stage_env(), check=True, capture_output=True)


def test_killed_training_resumes_to_the_same_weights(tmp_path, tiny_model_dir, tiny_policy):
    updates = 40
    whole = stage_dir(tmp_path / "whole", tiny_model_dir, tiny_policy, updates)
    cmd = [sys.executable, *TRAIN]
    subprocess.run(cmd, cwd=whole, env=stage_env(), check=True, capture_output=True)

    cut = stage_dir(tmp_path / "cut", tiny_model_dir, tiny_policy, updates)
    kill_at_first_checkpoint_then_resume(cmd, cut)

    metrics = json.loads((cut / "metrics/train.json").read_text())
    assert 0 < metrics["resumed_from_update"] < updates
    assert (cut / "models/policy/model.safetensors").read_bytes() == (whole / "models/policy/model.safetensors").read_bytes()
    log = (cut / "metrics/train_log.tsv").read_text().splitlines()
    assert len(log) == updates + 1 and log[0].startswith("update\tepisodes\tloss")
    assert not (cut / CHECKPOINTS).exists()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def set_train(root, **values):
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def one_process_run_and_two_process_project(tmp_path, tiny_model_dir, tiny_policy):
    """A project trained by one process (micro-batch 2 x accumulation 2, 4 updates of 4 pairs, clipping
    every update), and a copy set for two processes (micro-batch 1 x accumulation 2), not yet run."""
    settings = dict(total_episodes=16, save_every=100, max_grad_norm=0.05, learning_rate=1e-3, warmup_ratio=0.0)
    one = stage_dir(tmp_path / "one", tiny_model_dir, tiny_policy, 4)
    set_train(one, per_device_train_batch_size=2, gradient_accumulation_steps=2, **settings)
    subprocess.run([sys.executable, *TRAIN], cwd=one, env=stage_env(), check=True, capture_output=True)
    two = stage_dir(tmp_path / "two", tiny_model_dir, tiny_policy, 4)
    set_train(two, per_device_train_batch_size=1, gradient_accumulation_steps=2, **settings)
    return one, two


def test_two_processes_match_one_process(tmp_path, tiny_model_dir, tiny_policy):
    """`accelerate launch --cpu --num_processes 2` (DDP over gloo), micro-batch 1 x accumulation 2,
    ends with the weights and per-update losses of one process with micro-batch 2 x accumulation 2
    on the same pairs: accelerate accumulates, averages across processes and clips once per update
    (max_grad_norm small enough to clip every update here)."""
    from safetensors.torch import load_file

    one, two = one_process_run_and_two_process_project(tmp_path, tiny_model_dir, tiny_policy)
    # accelerate 1.x sends `--cpu --num_processes 2` to its one-process launcher; `--multi_gpu` is its
    # torchrun launcher, and the stage's Accelerator(cpu=True) (no CUDA here) makes that DDP over gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port()), *TRAIN]
    proc = subprocess.run(launch, cwd=two, env=stage_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    w1, w2 = assert_same_training(one, two)
    assert json.loads((two / "metrics/train.json").read_text())["distributed_type"] == "MULTI_CPU"
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = max((w1[k] - base[k]).abs().max().item() for k in w1)
    assert moved > 1e-3  # training changed the weights, so the comparison below means something
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def assert_same_training(one, two) -> tuple[dict, dict]:
    """Runs ``one`` (one process) and ``two`` (two processes) logged the same 4 updates of 4 pairs:
    episodes, losses and gradient norms (clipped every update) within float rounding; returns their
    saved weights."""
    from safetensors.torch import load_file

    log = {name: [line.split("\t") for line in (root / "metrics/train_log.tsv").read_text().splitlines()]
           for name, root in (("one", one), ("two", two))}
    header = log["one"][0]
    col = {c: header.index(c) for c in ("loss", "grad_norm", "episodes")}
    assert len(log["one"]) == len(log["two"]) == 5  # header + 4 updates of 4 pairs
    for a, b in zip(log["one"][1:], log["two"][1:]):
        assert a[col["episodes"]] == b[col["episodes"]]
        assert float(a[col["loss"]]) == pytest.approx(float(b[col["loss"]]), rel=1e-4, abs=1e-5)
        assert float(a[col["grad_norm"]]) == pytest.approx(float(b[col["grad_norm"]]), rel=1e-3)
        assert float(a[col["grad_norm"]]) > 0.05  # clipped every update
    metrics = json.loads((two / "metrics/train.json").read_text())
    assert metrics["world_size"] == 2 and metrics["batch_size"] == 4 and metrics["updates"] == 4
    return tuple(load_file(root / "models/policy/model.safetensors") for root in (one, two))


def deepspeed_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.skipif(not deepspeed_available() and not os.environ.get("RLHF_REQUIRE_DEEPSPEED"),
                    reason="DeepSpeed is not installed (make venv-deepspeed; CI sets RLHF_REQUIRE_DEEPSPEED)")
def test_deepspeed_zero3_two_processes_match_one_process(tmp_path, tiny_model_dir, tiny_policy):
    """ZeRO-3 on two CPU processes (`accelerate launch` with envs/accelerate/deepspeed_zero3_cpu.yaml,
    DeepSpeed's CPU accelerator over gloo), micro-batch 1 x accumulation 2, ends with the per-update
    losses, gradient norms and weights of one process without DeepSpeed at 2 x 2 (the tolerance of the
    DDP test above), clipping every update; the saved folder is one safetensors file of full tensors
    (ZeRO-3's shards gathered), and the run saw two processes."""
    one, two = one_process_run_and_two_process_project(tmp_path, tiny_model_dir, tiny_policy)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(REPO / "envs/accelerate/deepspeed_zero3_cpu.yaml"), "--num_processes", "2",
              "--main_process_port", str(free_port()), *TRAIN]
    env = {**stage_env(), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch, cwd=two, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    w1, w2 = assert_same_training(one, two)
    metrics = json.loads((two / "metrics/train.json").read_text())
    assert metrics["distributed_type"] == "DEEPSPEED" and metrics["zero_stage"] == 3
    assert json.loads((one / "metrics/train.json").read_text())["distributed_type"] == "NO"
    assert sorted(p.name for p in (two / "models/policy").iterdir() if p.suffix == ".safetensors") == [
        "model.safetensors"]
    assert set(w1) == set(w2) and all(w1[k].shape == w2[k].shape for k in w1)  # full tensors, not shards
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5)


def test_non_finite_loss_stops_before_the_step_and_writes_no_model(tiny_policy, tiny_model_dir, tmp_path):
    model, tok = tiny_policy
    pairs = synthetic_pairs(4)
    ref = reference(model, tok, pairs)
    ref = ref.set_column(1, "chosen_logprob", pa.array([0.0, float("inf"), 0.0, 0.0]))  # bypassing the reader
    cfg = TrainParams(per_device_train_batch_size=2, gradient_accumulation_steps=1, save_every=1, dtype="float32")
    with pytest.raises(PipelineError, match=r"^train: update \d has loss (nan|inf) and gradient norm"):
        run_training(tiny_model_dir, pairs, ref, cfg, tmp_path)
    assert not (tmp_path / "policy").exists() and not list(tmp_path.glob(".policy*"))


def test_checkpoint_holds_no_pickled_objects_and_loads_nothing_that_runs(tmp_path, tiny_model_dir, tiny_policy):
    """Training progress is JSON; accelerate's files are read with weights_only, so a pickle that
    would run code when loaded is refused, and the run stops with a one-line error."""
    import pickle

    updates = 3
    root = stage_dir(tmp_path / "p", tiny_model_dir, tiny_policy, updates)
    proc = subprocess.Popen([sys.executable, *TRAIN], cwd=root, env=stage_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = root / CHECKPOINTS / "latest"
    deadline = time.time() + 300
    while not (latest / "fingerprint").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = sorted(p.name for p in latest.iterdir())
    assert "progress.json" in files and not [f for f in files if f.startswith("custom_checkpoint")]
    progress = json.loads((latest / "progress.json").read_text())
    assert progress["update"] >= 1 and len(progress["rows"]) == progress["update"] and "scheduler" in progress

    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    saved = {p.name: p.read_bytes() for p in latest.iterdir()}
    # accelerate unpickles custom_checkpoint_*.pkl with weights_only=False (the stage registers none,
    # so accelerate refuses such a file unread); its other files go through weights_only=True.
    for planted in ("custom_checkpoint_0.pkl", "optimizer.bin"):
        shutil.rmtree(latest)
        latest.mkdir()
        for name, data in saved.items():
            (latest / name).write_bytes(data)
        (latest / planted).write_bytes(pickle.dumps({"state": Payload()}))
        done = subprocess.run([sys.executable, *TRAIN], cwd=root, env=stage_env(), capture_output=True,
                              text=True)
        assert done.returncode == 1 and not marker.exists(), planted
        assert "Traceback" not in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith(
            f"error: {CHECKPOINTS}/latest: the training checkpoint cannot be loaded safely"), planted


def test_the_checkpoint_fingerprint_holds_the_code(tmp_path, monkeypatch):
    # kill train, edit the loss, rerun: the run resumed with updates of the old loss before the edit
    from rlhf_pipeline import training

    code = tmp_path / "pkg"
    code.mkdir()
    (code / "losses.py").write_text("def loss(x):\n    return x ** 2\n")
    monkeypatch.setattr(training, "CODE_ROOTS", (code,))
    before = training.inputs_fingerprint([], TrainParams(), 0, 1.0)
    assert training.inputs_fingerprint([], TrainParams(), 0, 1.0) == before
    (code / "losses.py").write_text("def loss(x):\n    return abs(x)\n")
    assert training.inputs_fingerprint([], TrainParams(), 0, 1.0) != before
    monkeypatch.undo()
    assert (REPO / "rlhf_pipeline" / "training.py") in [f for root in training.CODE_ROOTS for f in root.rglob("*.py")]


def test_an_optimizer_step_that_leaves_non_finite_weights_stops_training(tiny_policy, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    # a finite loss and gradient norm, then a step that overflows (an extreme learning rate, Adam's moments)
    model, tok = tiny_policy
    pairs = synthetic_pairs(4)
    original = torch.optim.AdamW.step

    def overflowing_step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        with torch.no_grad():
            self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", overflowing_step)
    cfg = TrainParams(objective={"name": "rebel", "eta": 1.0}, temperature=1.0, per_device_train_batch_size=2,
                      gradient_accumulation_steps=1, dtype="float32")
    with pytest.raises(PipelineError, match="the optimizer step of update 1 left non-finite weights"):
        run_training(tiny_model_dir, pairs, reference(model, tok, pairs), cfg, tmp_path)
    assert not (tmp_path / "policy").exists()


def test_the_episode_order_is_computed_one_update_at_a_time():
    # train.total_episodes: 1e9 spent minutes building the whole order before the first update
    from rlhf_pipeline.training import episode_slice

    whole = episode_order(7, 40, seed=3)
    assert [i for a in range(0, 40, 4) for i in episode_slice(7, 3, a, a + 4)] == whole
    # the last of 2.5e8 epochs, computed alone (the whole order would hold 10^9 ints: gigabytes)
    assert sorted(episode_slice(4, 0, 10**9 - 4, 10**9)) == [0, 1, 2, 3]
