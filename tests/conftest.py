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
    SmolLM2 tokenizer exactly as the GGUF gives it (EOS wrongly ``<|im_start|>``, no pad)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rlhf_pipeline.models import resolve_model_source

    out = tmp_path_factory.mktemp("raw_tiny_model")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(out)
    src = resolve_model_source("smollm2-135m-instruct")
    AutoTokenizer.from_pretrained(src.name_or_path, gguf_file=src.gguf_file).save_pretrained(out)
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


def project_files() -> list[str]:
    """Tracked and untracked-but-not-ignored files of the working tree (what a commit would hold)."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def make_project_clone(dest: Path) -> Path:
    """A temporary git repository holding the project's working tree, DVC outputs excluded."""
    dest.mkdir(parents=True, exist_ok=True)
    for rel in project_files():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target)
    for leftover in ("dvc.lock",):  # the clone's own runs write their own lock
        (dest / leftover).unlink(missing_ok=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "clone"], cwd=dest, check=True)
    return dest


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
