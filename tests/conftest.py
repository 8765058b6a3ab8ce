"""Shared fixtures: a tiny random Llama with the real SmolLM2 tokenizer, and project clones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # One thread per worker and per stage subprocess: OpenMP threads of processes sharing the
    # cores wait on each other's descheduled threads (docs/measurements-2026.md, "A busy machine": 7x on two cores).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


def tiny_llama_config(**overrides):
    """A 2-layer Llama with grouped-query attention (4 query / 2 KV heads), SmolLM2's vocabulary
    and special-token ids (bos 1 ``<|im_start|>``, eos 2 ``<|im_end|>``)."""
    from transformers import LlamaConfig

    cfg = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
               bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=True)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def raw_tiny_model_dir(tmp_path_factory) -> Path:
    """A model folder as a user would point ``policy.model`` at: random tiny Llama weights and the
    SmolLM2 tokenizer with EOS wrongly ``<|im_start|>`` and no pad, as transformers 4.x read the GGUF."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rlhf_pipeline.models import resolve_model_source

    out = tmp_path_factory.mktemp("raw_tiny_model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(out)
    src = resolve_model_source("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(src.name_or_path, gguf_file=src.gguf_file)
    # transformers < 5 read the GGUF's EOS as <|im_start|> and no pad token; 5.x reads <|im_end|>.
    # Pinned to the older reading, so prepare_base_model's repair is exercised on every version.
    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(raw_tiny_model_dir, tmp_path_factory) -> Path:
    """``raw_tiny_model_dir`` after the prepare_model stage's conversion (models/base layout)."""
    from rlhf_pipeline.models import prepare_base_model

    out = tmp_path_factory.mktemp("tiny_base") / "base"
    prepare_base_model(str(raw_tiny_model_dir), out)
    return out


@pytest.fixture(scope="session")
def tiny_policy(tiny_model_dir):
    import torch

    from rlhf_pipeline.models import load_policy, load_tokenizer

    return load_policy(tiny_model_dir, torch.float32, torch.device("cpu")), load_tokenizer(tiny_model_dir)


#: Each stage's command line in a one-iteration project laid out as before iterations (data/*.parquet),
#: for tests that run a stage module by itself; dvc.yaml passes the same options with its own paths.
STAGE_ARGS = {
    "prepare_model": "--out models/base --metrics metrics/prepare_model.json",
    "prepare_prompts": "--model models/base --train data/prompts/train.parquet --val data/prompts/val.parquet "
                       "--test data/prompts/test.parquet --metrics metrics/prepare_prompts.json",
    "generate": "--iteration iter_1 --policy models/base --prompts data/prompts/train.parquet "
                "--out data/generations.parquet --metrics metrics/generate.json",
    "score": "--generations data/generations.parquet --prompts data/prompts/train.parquet --out data/scores.parquet "
             "--metrics metrics/score.json",
    "pairs": "--tokenizer models/base --prompts data/prompts/train.parquet --generations data/generations.parquet "
             "--scores data/scores.parquet --out data/pairs.parquet --metrics metrics/pairs.json",
    "ref_logprobs": "--previous models/base --base models/base --pairs data/pairs.parquet "
                    "--out data/ref_logprobs.parquet --metrics metrics/ref_logprobs.json",
    "evaluate_base": "--policy models/base --val data/prompts/val.parquet --test data/prompts/test.parquet "
                     "--out data/eval/base.parquet --metrics metrics/eval/base.json",
    "benchmark_base": "--policy models/base --out data/benchmark/base.parquet --metrics metrics/benchmark/base.json",
}


def stage_command(name: str) -> list[str]:
    """``python -m stages.<name> <STAGE_ARGS[name]>`` with this interpreter."""
    return [sys.executable, "-m", f"stages.{name}", *STAGE_ARGS[name].split()]


def make_project_clone(dest: Path) -> Path:
    """A temporary git repository holding the project's working tree, DVC outputs and lock excluded."""
    from rlhf_pipeline.repro_check import scratch_copy

    return scratch_copy(REPO, dest)


def stage_env() -> dict[str, str]:
    """Environment for stage subprocesses: this interpreter's environment first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):  # tests choose their own store
        env.pop(key, None)
    return env


def run_dvc(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=stage_env(),
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def tiny_params(model_dir, reward_model_dir) -> dict:
    """The repository's params.yaml with tiny overrides (DVC needs every declared key present)."""
    import yaml

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
        # two iterations (params.yaml's default runs one): the tests of the DAG check the iteration chain
        "iterations": {"iter_1": {"prev": "base"}, "iter_2": {"prev": "iter_1"}},
        # 12 train prompts: 4 per iteration, so a third iteration fits (tests/test_pipeline_dvc.py)
        "data": {"source": "ifeval", "num_prompts": 20, "test_size": 4, "val_size": 4, "prompts_per_iteration": 4},
        "generate": {"num_responses": 4, "max_new_tokens": 16, "batch_size": 16, "dtype": "float32"},
        # A random tiny policy follows no IFEval instruction, so every IFEval reward ties; the tiny
        # reward model's continuous score gives each prompt a spread, hence pairs.
        "reward": {"scorers": [{"name": "ifeval", "weight": 1.0},
                               {"name": "sequence-classification", "weight": 1.0,
                                "options": {"model": str(reward_model_dir), "dtype": "float32"}}]},
        "pairs": {"max_prompt_tokens": 1024, "max_response_tokens": 2048, "min_reward_gap": 0.0},
        # REBEL: the tests of the iterated DAG check its regression (the committed default is iterated DPO)
        "train": {"objective": {"name": "rebel", "eta": 1.0}, "dtype": "float32", "logprob_batch_size": 4,
                  "learning_rate": 1e-4,
                  "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 2},
        "evaluate": {"num_responses": 2, "max_new_tokens": 12, "bootstrap_samples": 500, "logprob_batch_size": 4},
        "benchmark": {"num_prompts": 6, "max_new_tokens": 8, "bootstrap_samples": 200},
        # 16 short AlpacaEval demonstrations, 4 held out: 8 updates
        "sft": {"num_demonstrations": 20, "val_size": 4, "max_tokens": 160, "learning_rate": 1e-3, "dtype": "float32",
                "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 2,
                "per_device_eval_batch_size": 4},
        # 2 rollout steps of 2 prompts x 2 responses for PPO, GRPO and online REBEL: 4 updates a step (2 pairs for rebel)
        "online": {"rollout_steps": 2, "prompts_per_step": 2, "num_responses": 2, "max_new_tokens": 8,
                   "generation_batch_size": 8, "logprob_batch_size": 4, "learning_rate": 1e-4,
                   "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1, "save_every": 2},
        # iteration 1's 4 prompts x 4 responses give up to 24 pairs: one prompt's held out
        "reward_model": {"val_size": 1, "learning_rate": 1e-3, "dtype": "float32", "per_device_train_batch_size": 2,
                         "gradient_accumulation_steps": 1, "save_every": 2, "per_device_eval_batch_size": 4,
                         "bootstrap_samples": 200, "calibration_bins": 2},
    }


def lock_md5s(proj: Path) -> dict[str, str]:
    """md5 of every data and model output in dvc.lock (metrics hold timings, so they differ)."""
    import yaml

    lock = yaml.safe_load((proj / "dvc.lock").read_text())
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])
            if not o["path"].startswith("metrics/")}


def ran(out: str) -> set[str]:
    """Stages that `dvc repro` output says it ran."""
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}


def set_param(project: Path, section: str, key: str, value) -> None:
    import yaml

    params = yaml.safe_load((project / "params.yaml").read_text())
    params[section][key] = value
    (project / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory, raw_tiny_model_dir, tiny_reward_model_dir) -> Path:
    """The whole DAG run once by `dvc repro` on the tiny config in a temporary git clone.

    Shared by several test modules: do not change it; tests that change params or code work on
    :func:`copy_project` copies. Its report stage logged to the default store, <project>/mlflow.db.
    """
    import yaml

    proj = make_project_clone(tmp_path_factory.mktemp("tiny_project") / "proj")
    add_tiny_model(proj, raw_tiny_model_dir)
    (proj / "params.yaml").write_text(yaml.safe_dump(tiny_params(TINY_MODEL, tiny_reward_model_dir)))
    run_dvc(proj, "repro")
    return proj


#: Where a tiny project keeps its policy: a local policy.model folder must lie under data/sources/.
TINY_MODEL = "data/sources/tiny_model"


def add_tiny_model(project: Path, raw_model_dir: Path) -> None:
    """Copy the raw tiny model to :data:`TINY_MODEL` in ``project`` and commit it (queued experiments
    and scratch copies take committed files)."""
    shutil.copytree(raw_model_dir, project / TINY_MODEL)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["add", TINY_MODEL], cwd=project, check=True)
    subprocess.run(git + ["commit", "-qm", "tiny model"], cwd=project, check=True)


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a project with its git history, DVC cache, outputs, lock and mlflow.db."""
    shutil.copytree(src, dest, symlinks=True)
    return dest


def build_reward_model(out: Path, tokenizer_dir: Path, nan: bool = False) -> Path:
    """A tiny random Bradley–Terry-style reward model (one logit) with the SmolLM2 tokenizer;
    ``nan=True`` makes its score head output NaN."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    torch.manual_seed(1)
    model = LlamaForSequenceClassification(tiny_llama_config(num_labels=1, pad_token_id=2))
    if nan:
        with torch.no_grad():
            model.score.weight.fill_(float("nan"))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_reward_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("tiny_rm") / "rm", tiny_model_dir)
