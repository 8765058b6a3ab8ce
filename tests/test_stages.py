"""Stage entry points on bad input: one clear error, exit 1, no output left behind."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import REPO, stage_command, stage_env


def run_stage(cwd, name):
    (cwd / "stages").exists() or (cwd / "stages").symlink_to(REPO / "stages")
    return subprocess.run(stage_command(name), cwd=cwd, env=stage_env(), capture_output=True, text=True)


def write_params(cwd, data=None, policy=None, **sections):
    """The committed params.yaml with ``data``, ``policy`` and other sections' keys replaced (one
    validation prompt unless ``data`` says otherwise)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    if data and "test_size" in data:
        data = {"val_size": 1, **data}
    if data and "num_prompts" in data:  # a handful of prompts: one train prompt serves every iteration
        data = {"prompts_per_iteration": 1, "reuse_prompts": True, **data}
    for name, values in {"data": data or {}, "policy": policy or {}, **sections}.items():
        raw[name].update(values)
    (cwd / "params.yaml").write_text(yaml.safe_dump(raw))


def with_base(cwd, tiny_model_dir):
    shutil.copytree(tiny_model_dir, cwd / "models/base")
    return cwd


def no_temporaries(root):
    return [p for p in root.rglob(".*tmp-*")]


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
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "num_prompts": 3, "test_size": 1})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "data/prompts").exists() or not any((tmp_path / "data/prompts").iterdir())


def test_prepare_prompts_from_file(tmp_path, tiny_model_dir):
    with_base(tmp_path, tiny_model_dir)
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/p.jsonl").write_text("".join(f'{{"q": "question {i}"}}\n' for i in range(6)))
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "prompt_field": "q",
                            "num_prompts": 5, "test_size": 2})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 0, proc.stderr
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "data/prompts/train.parquet").num_rows == 2
    assert pq.read_table(tmp_path / "data/prompts/val.parquet").num_rows == 1
    assert pq.read_table(tmp_path / "data/prompts/test.parquet").num_rows == 2


def test_prepare_model_unknown_path(tmp_path):
    write_params(tmp_path, policy={"model": "./data/sources/no/such/model"})
    proc = run_stage(tmp_path, "prepare_model")
    assert proc.returncode == 1
    assert "error: policy.model: local path './data/sources/no/such/model' does not exist" in proc.stderr
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


@pytest.mark.parametrize("model", ["./no/such/model", "/abs/model", "../elsewhere/model"])
def test_a_local_model_folder_must_be_tracked(tmp_path, model):
    # edited after prepare_model, a folder outside data/sources/ left `dvc status` saying up to date
    write_params(tmp_path, policy={"model": model})
    proc = run_stage(tmp_path, "prepare_model")
    assert proc.returncode == 1
    assert f"error: params.yaml: policy.model: {model!r} is a local folder outside data/sources/" in proc.stderr


def test_a_link_out_of_the_sources_folder_is_refused(tmp_path, raw_tiny_model_dir):
    (tmp_path / "data/sources").mkdir(parents=True)
    (tmp_path / "data/sources/linked").symlink_to(raw_tiny_model_dir)
    write_params(tmp_path, policy={"model": "data/sources/linked"})
    proc = run_stage(tmp_path, "prepare_model")
    assert proc.returncode == 1 and "(a symbolic link): DVC would not see its edits" in proc.stderr


def test_unknown_source_named(tmp_path):
    write_params(tmp_path, {"source": "s3"})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1 and "params.yaml: data.source:" in proc.stderr


def test_generate_without_prompts(tmp_path):
    write_params(tmp_path)
    proc = run_stage(tmp_path, "generate")
    assert proc.returncode == 1 and "data/prompts/train.parquet: input file not found" in proc.stderr
    assert not (tmp_path / "data/generations.parquet").exists()


def test_long_prompts_are_dropped_before_the_draw(tmp_path, tiny_model_dir):
    """A 100,000-character prompt used to reach generate (25,001 tokens against 2,048 positions)."""
    with_base(tmp_path, tiny_model_dir)
    (tmp_path / "data/sources").mkdir(parents=True)
    rows = [{"prompt": f"question {i}"} for i in range(6)] + [{"prompt": "word " * 20_000}]
    (tmp_path / "data/sources/p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "num_prompts": 6, "test_size": 2})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((tmp_path / "metrics/prepare_prompts.json").read_text())
    assert metrics["dropped_prompt_too_long"] == 1 and metrics["selected"] == 6
    assert metrics["max_prompt_tokens"] == 1024  # min(pairs.max_prompt_tokens 1024, 2048 - 256)
    kept = pq.read_table(tmp_path / "data/prompts/train.parquet").column("prompt").to_pylist()
    assert all(len(p) < 100 for p in kept)

    (tmp_path / "data/sources/p.jsonl").write_text(json.dumps({"prompt": "word " * 20_000}) + "\n")
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "num_prompts": None, "test_size": 1})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1 and "every prompt is longer than 1024 tokens" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_link_out_of_the_sources_folder_is_refused(tmp_path, tiny_model_dir):
    with_base(tmp_path, tiny_model_dir)
    (tmp_path / "data/sources").mkdir(parents=True)
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text("".join(f'{{"prompt": "q {i}"}}\n' for i in range(4)))
    (tmp_path / "data/sources/p.jsonl").symlink_to(outside)
    write_params(tmp_path, {"source": "file", "path": "data/sources/p.jsonl", "num_prompts": 4, "test_size": 1})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: data.path: data/sources/p.jsonl resolves to {outside}, outside data/sources/" in proc.stderr
    assert not (tmp_path / "data/prompts").exists()


def test_huggingface_local_files_must_be_tracked_and_the_fingerprint_is_recorded(tmp_path, tiny_model_dir):
    with_base(tmp_path, tiny_model_dir)
    (tmp_path / "data/sources").mkdir(parents=True)
    outside = tmp_path / "outside.jsonl"
    outside.write_text("".join(f'{{"prompt": "q {i}"}}\n' for i in range(4)))
    write_params(tmp_path, {"source": "huggingface", "dataset": "json", "data_files": str(outside),
                            "num_prompts": 4, "test_size": 1})
    proc = run_stage(tmp_path, "prepare_prompts")
    assert proc.returncode == 1 and f"error: data.data_files: {outside} resolves to" in proc.stderr

    inside = tmp_path / "data/sources/p.jsonl"
    fingerprints = []
    for n in (4, 5):
        inside.write_text("".join(f'{{"prompt": "q {i}"}}\n' for i in range(n)))
        write_params(tmp_path, {"source": "huggingface", "dataset": "json", "data_files": "data/sources/p.jsonl",
                                "num_prompts": 4, "test_size": 1})
        proc = run_stage(tmp_path, "prepare_prompts")
        assert proc.returncode == 0, proc.stderr
        fingerprints.append(json.loads((tmp_path / "metrics/prepare_prompts.json").read_text())["dataset_fingerprint"])
    assert fingerprints[0] != fingerprints[1]  # an edited data file shows in the metrics


def scores_stage_dir(root, gens_rows, score_rows=None):
    """A project with generations (and scores) files for the score and pairs stages."""
    (root / "data/prompts").mkdir(parents=True)
    ids = pa.list_(pa.int32())
    pq.write_table(pa.table({"prompt_id": ["a"], "prompt": ["Say hi."]}), root / "data/prompts/train.parquet")
    gens = pa.table({"prompt_id": pa.array([r[0] for r in gens_rows], pa.string()),
                     "response_idx": pa.array([r[1] for r in gens_rows], pa.int32()),
                     "response": pa.array([r[2] for r in gens_rows], pa.string()),
                     "finish_reason": pa.array(["stop"] * len(gens_rows), pa.string()),
                     "token_ids": pa.array([[5, 2]] * len(gens_rows), ids)})
    pq.write_table(gens, root / "data/generations.parquet")
    if score_rows is not None:
        pq.write_table(pa.table({"prompt_id": pa.array([r[0] for r in score_rows], pa.string()),
                                 "response_idx": pa.array([r[1] for r in score_rows], pa.int32()),
                                 "reward": pa.array([r[2] for r in score_rows], pa.float64())}),
                       root / "data/scores.parquet")
    return root


def test_empty_generations_stop_score_before_any_output(tmp_path):
    root = scores_stage_dir(tmp_path, [])
    write_params(root)
    proc = run_stage(root, "score")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: data/generations.parquet: no rows" in proc.stderr
    assert not (root / "data/scores.parquet").exists() and not (root / "metrics").exists()


def test_empty_pairs_stop_ref_logprobs_before_any_output(tmp_path, tiny_model_dir):
    with_base(tmp_path, tiny_model_dir)
    from rlhf_pipeline.schemas import PAIRS as PAIRS_SCHEMA

    (tmp_path / "data").mkdir()
    pq.write_table(PAIRS_SCHEMA.empty_table(), tmp_path / "data/pairs.parquet")
    write_params(tmp_path)
    proc = run_stage(tmp_path, "ref_logprobs")
    assert proc.returncode == 1 and "error: data/pairs.parquet: no rows" in proc.stderr
    assert not (tmp_path / "data/ref_logprobs.parquet").exists() and not (tmp_path / "metrics").exists()


@pytest.mark.parametrize("reward, shown", [(float("inf"), "inf"), (float("nan"), "nan"), (None, "None")])
def test_a_non_finite_or_null_reward_stops_pairs(tmp_path, tiny_model_dir, reward, shown):
    """An inf reward used to pass pairs, ref_logprobs and train and turn every weight NaN; a NaN
    was counted as a reward tie; a null was a traceback."""
    with_base(tmp_path, tiny_model_dir)
    root = scores_stage_dir(tmp_path, [("a", 0, "x"), ("a", 1, "y")], [("a", 0, 1.0), ("a", 1, reward)])
    write_params(root)
    proc = run_stage(root, "pairs")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data/scores.parquet: column 'reward': row 1 is null") and shown in last
    assert not (root / "data/pairs.parquet").exists()


FAULTS = REPO / "tests/fault_injection"


SPLITS = ("data/prompts/train.parquet", "data/prompts/val.parquet", "data/prompts/test.parquet")


def rerun_prompts_with_fault(root, tiny_model_dir, fault: str, path_part: str, data: dict):
    """prepare_prompts run once (20 prompts, 5 held out), then again with ``data`` and a fault
    injected; returns (the second run, the splits' bytes after the first)."""
    with_base(root, tiny_model_dir)
    write_params(root, {"num_prompts": 20, "test_size": 5})
    assert run_stage(root, "prepare_prompts").returncode == 0
    before = {p: (root / p).read_bytes() for p in SPLITS}
    write_params(root, data)
    env = {**stage_env(), "PYTHONPATH": str(FAULTS), "RLHF_FAULT": fault,
           "RLHF_FAULT_STAGE": "stages.prepare_prompts", "RLHF_FAULT_PATH": path_part}
    proc = subprocess.run(stage_command("prepare_prompts"), cwd=root, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    return proc, before


def test_sigterm_mid_write_leaves_old_outputs_and_no_temporaries(tmp_path, tiny_model_dir):
    """SIGTERM while prepare_prompts writes its last file: the old splits stay, nothing half-made."""
    proc, before = rerun_prompts_with_fault(tmp_path, tiny_model_dir, "term-writing-parquet", "test.parquet",
                                            {"num_prompts": 30, "test_size": 5})
    assert "interrupted (signal SIGTERM)" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: (tmp_path / p).read_bytes() for p in before} == before
    assert no_temporaries(tmp_path) == []


def test_sigterm_between_the_renames_waits_until_both_are_in_place(tmp_path, tiny_model_dir):
    """A SIGTERM after the first output is renamed used to leave a new train split beside the old
    test split; now it is held until the group is in place, then ends the stage."""
    _, before = rerun_prompts_with_fault(tmp_path, tiny_model_dir, "term-after-first-rename", "prompts",
                                         {"num_prompts": 30, "test_size": 8})
    old_test = before["data/prompts/test.parquet"]
    train = pq.read_table(tmp_path / "data/prompts/train.parquet").column("prompt_id").to_pylist()
    test = pq.read_table(tmp_path / "data/prompts/test.parquet").column("prompt_id").to_pylist()
    assert (tmp_path / "data/prompts/test.parquet").read_bytes() != old_test
    assert (len(train), len(test)) == (21, 8) and not set(train) & set(test)
    assert no_temporaries(tmp_path) == []


def test_iterations_that_would_run_out_of_prompts_fail_before_any_iteration(tmp_path, tiny_model_dir):
    # 50 iterations validated, and generate@iter_15 failed after iterations 3-14 ran
    with_base(tmp_path, tiny_model_dir)
    (tmp_path / "data/sources").mkdir(parents=True)
    rows = [{"prompt": f"question {i}", "control": "<|im_start|>" if i == 9 else ""} for i in range(10)]
    (tmp_path / "data/sources/p.jsonl").write_text(
        "".join(json.dumps({"prompt": r["prompt"] + r["control"]}) + "\n" for r in rows))
    iterations = {f"iter_{t}": {"prev": "base" if t == 1 else f"iter_{t - 1}"} for t in range(1, 5)}
    data = {"source": "file", "path": "data/sources/p.jsonl", "num_prompts": None, "test_size": 2, "val_size": 1,
            "prompts_per_iteration": 2, "reuse_prompts": False}
    write_params(tmp_path, data, iterations=iterations)
    proc = run_stage(tmp_path, "prepare_prompts")
    # 10 prompts, one with a control token dropped, 3 held out: 6 train prompts for 4 x 2
    assert proc.returncode == 1
    assert "iterations: 4 iterations of data.prompts_per_iteration=2 disjoint prompts need 8 train prompts, " \
           "but the train split has 6" in proc.stderr
    assert not (tmp_path / "data/prompts").exists()
    write_params(tmp_path, data, iterations={k: v for k, v in iterations.items() if k in ("iter_1", "iter_2", "iter_3")})
    assert run_stage(tmp_path, "prepare_prompts").returncode == 0
    assert json.loads((tmp_path / "metrics/prepare_prompts.json").read_text())["dropped_control_tokens"] == 1


def held_out_prompts(root, test_ids_from_val: int = 0):
    """data/prompts/{val,test}.parquet from IFEval: 2 validation and 3 test prompts (the test file
    reusing the first ``test_ids_from_val`` validation prompts)."""
    from rlhf_pipeline.data import load_ifeval, split_prompts

    split = split_prompts(load_ifeval(), 8, 3, 2, seed=0)
    test = pa.concat_tables([split.val.slice(0, test_ids_from_val), split.test]) if test_ids_from_val else split.test
    (root / "data/prompts").mkdir(parents=True)
    pq.write_table(split.val, root / "data/prompts/val.parquet")
    pq.write_table(test, root / "data/prompts/test.parquet")
    return split.val, test


def test_evaluate_base_samples_both_splits_as_one_split_at_a_time_would(tmp_path, tiny_model_dir):
    """One sampling pass for validation and test: each split's rows, in order, are what sampling that
    split alone gives (same seeds), and its metrics are that split's."""
    from rlhf_pipeline.evaluation import policy_summary, sample_and_score
    from rlhf_pipeline.params import load_params
    from rlhf_pipeline.rewards import Scorers

    with_base(tmp_path, tiny_model_dir)
    val, test = held_out_prompts(tmp_path)
    write_params(tmp_path, generate={"dtype": "float32", "batch_size": 4},
                 evaluate={"num_responses": 2, "max_new_tokens": 6, "temperature": 0.8})
    proc = run_stage(tmp_path, "evaluate_base")
    assert proc.returncode == 0, proc.stderr
    out = pq.read_table(tmp_path / "data/eval/base.parquet")
    metrics = json.loads((tmp_path / "metrics/eval/base.json").read_text())
    assert out.column("split").to_pylist() == ["val"] * 4 + ["test"] * 6
    params = load_params(tmp_path / "params.yaml")
    scorers = Scorers(params.reward)
    for split, prompts in (("val", val), ("test", test)):
        alone, _ = sample_and_score(tmp_path / "models/base", prompts, params.evaluate.sampling(params.generate),
                                    scorers, params.seed, split)
        part = out.filter(pc.equal(out.column("split"), split)).drop_columns(["split"])
        assert part.to_pylist() == alone.to_pylist()
        assert metrics[split] == {"prompts": prompts.num_rows, **policy_summary(alone, scorers)}
    assert metrics["generation_seconds"] > 0 and "generation_seconds" not in metrics["val"]


def test_evaluate_base_refuses_a_prompt_in_both_splits(tmp_path, tiny_model_dir):
    with_base(tmp_path, tiny_model_dir)
    val, _ = held_out_prompts(tmp_path, test_ids_from_val=1)
    write_params(tmp_path)
    proc = run_stage(tmp_path, "evaluate_base")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (f"data/prompts/val.parquet and data/prompts/test.parquet both hold 1 prompt id(s), e.g. "
            f"{val.column('prompt_id')[0].as_py()}: rerun prepare_prompts") in proc.stderr
    assert not (tmp_path / "data/eval").exists() and not (tmp_path / "metrics").exists()
