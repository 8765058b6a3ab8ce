"""LoRA (peft) on the one training loop: only the factors train, the saved folder holds the merged
weights (loadable as any policy) and the adapter, the LoRA dropout survives the loop's dropout-off,
LoRA settings change the checkpoint fingerprint, a killed LoRA run resumes to the same bytes, and
QLoRA fails at once where it cannot run."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import stage_env
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.lora import ADAPTER_DIR, check_quantization
from rlhf_pipeline.models import load_policy
from rlhf_pipeline.params import LoraParams, RewardModelParams, TrainParams
from rlhf_pipeline.training import inputs_fingerprint
from test_training import (TRAIN, kill_at_first_checkpoint_then_resume, reference, run_training, stage_dir,
                           synthetic_pairs)

CPU = torch.device("cpu")


def lora_train_params(**lora):
    return TrainParams(objective={"name": "rebel", "eta": 1.0}, temperature=1.0, learning_rate=1e-2, epochs=6,
                       per_device_train_batch_size=2, gradient_accumulation_steps=2, warmup_ratio=0.0,
                       save_every=100, dtype="float32", lora={"r": 4, "alpha": 8, **lora})


def test_lora_trains_the_factors_only_and_saves_merged_weights_and_adapter(tiny_policy, tiny_model_dir, tmp_path):
    from peft import PeftModel

    model, tok = tiny_policy
    pairs = synthetic_pairs()
    ref = reference(model, tok, pairs)
    cfg = lora_train_params(dropout=0.0)
    rows, summary = run_training(tiny_model_dir, pairs, ref, cfg, tmp_path / "a")
    total = sum(p.numel() for p in model.parameters())
    # all-linear on the tiny Llama: q, k, v, o, gate, up, down per layer; r (d_in + d_out) each
    assert 0 < summary["trainable_parameters"] < total / 10
    out = tmp_path / "a/policy"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert json.loads((out / ADAPTER_DIR / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "adapter_config.json").exists()  # the folder loads as a plain model, not an adapter

    # The merged folder is a plain policy that learned the preference ...
    trained = load_policy(out, torch.float32, CPU)
    after = reference(trained, tok, pairs)
    margin = lambda t: [c - r for c, r in zip(t.column("chosen_logprob").to_pylist(),
                                              t.column("rejected_logprob").to_pylist())]
    assert all(a > b + 0.5 for a, b in zip(margin(after), margin(ref)))
    # ... whose weights are the base's plus (alpha / r) B A on the target layers only: the same
    # log-probs as the base with the adapter loaded by peft, and untouched embeddings.
    base_weights, merged_weights = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert torch.equal(base_weights["model.embed_tokens.weight"], merged_weights["model.embed_tokens.weight"])
    changed = [k for k in base_weights if not torch.equal(base_weights[k], merged_weights[k])]
    assert changed and all(k.endswith("_proj.weight") for k in changed)
    with_adapter = PeftModel.from_pretrained(load_policy(tiny_model_dir, torch.float32, CPU), out / ADAPTER_DIR).eval()
    assert margin(reference(with_adapter, tok, pairs)) == pytest.approx(margin(after), abs=1e-4)

    # Same inputs, same bytes: adapter and merged weights.
    run_training(tiny_model_dir, pairs, ref, cfg, tmp_path / "b")
    for f in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors", f"{ADAPTER_DIR}/adapter_config.json"):
        assert (tmp_path / "b/policy" / f).read_bytes() == (out / f).read_bytes(), f


def test_the_loop_turns_the_model_dropout_off_but_keeps_the_lora_dropout(tiny_policy, tiny_model_dir, tmp_path):
    model, tok = tiny_policy
    noisy = tmp_path / "noisy"  # the policy itself has attention dropout, which training must not apply
    shutil.copytree(tiny_model_dir, noisy)
    config = json.loads((noisy / "config.json").read_text())
    (noisy / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    pairs = synthetic_pairs(4)
    seen = {}

    def inspect(policy):
        seen["attention"] = {m.attention_dropout for m in policy.modules() if hasattr(m, "attention_dropout")}
        seen["lora"] = {m.p for n, m in policy.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n}
        seen["other"] = {m.p for n, m in policy.named_modules()
                         if isinstance(m, torch.nn.Dropout) and "lora_dropout" not in n}
        return {}

    cfg = lora_train_params(dropout=0.25).model_copy(update={"epochs": 1})
    run_training(noisy, pairs, reference(model, tok, pairs), cfg, tmp_path, evaluate=inspect)
    assert seen["attention"] == {0.0} and seen["lora"] == {0.25} and seen["other"] <= {0.0}


def test_lora_settings_are_part_of_the_checkpoint_fingerprint():
    prints = {inputs_fingerprint([], TrainParams(lora=lora), 0, 1.0)
              for lora in (None, {"r": 8}, {"r": 16}, {"r": 16, "dropout": 0.0}, {"r": 16, "target_modules": ["q_proj"]})}
    assert len(prints) == 5


@pytest.mark.parametrize("lora, message", [
    ({"r": 0}, "r"), ({"dropout": 1.0}, "dropout"), ({"alpha": True}, "alpha"), ({"rank": 8}, "rank"),
    ({"target_modules": []}, "target_modules")])
def test_bad_lora_params_are_named(lora, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        TrainParams(lora=lora)


def test_a_target_module_the_model_lacks_is_one_error(tiny_policy, tiny_model_dir, tmp_path):
    model, tok = tiny_policy
    pairs = synthetic_pairs(4)
    with pytest.raises(PipelineError, match=r"^train.lora.target_modules \['qkv'\]"):
        run_training(tiny_model_dir, pairs, reference(model, tok, pairs), lora_train_params(target_modules=["qkv"]),
                     tmp_path)
    assert not (tmp_path / "policy").exists()


def test_lora_on_a_head_tied_to_the_embeddings_is_refused(tiny_policy, tiny_model_dir, tmp_path):
    # The tiny Llama ties lm_head to embed_tokens, as SmolLM2 does: merging factors on the head would
    # move the embeddings too (0.003 in the logits), so the saved model would not be the trained one.
    model, tok = tiny_policy
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    pairs = synthetic_pairs(4)
    with pytest.raises(PipelineError, match=r"train.lora.target_modules \['q_proj', 'lm_head'\]: the output head shares"):
        run_training(tiny_model_dir, pairs, reference(model, tok, pairs),
                     lora_train_params(target_modules=["q_proj", "lm_head"]), tmp_path)
    assert not (tmp_path / "policy").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-only error")
def test_qlora_without_cuda_fails_before_any_model_loads(tiny_model_dir, tmp_path):
    with pytest.raises(PipelineError, match=r"sft.lora.load_in_4bit: .* needs a CUDA device"):
        check_quantization(LoraParams(load_in_4bit=True), "sft")
    check_quantization(LoraParams(), "sft")  # plain LoRA runs anywhere
    check_quantization(None, "sft")


def test_a_lora_reward_model_trains_its_new_head_and_scores_as_trained(tiny_policy, tiny_model_dir, tmp_path):
    from rlhf_pipeline.objectives import RewardModelTask
    from rlhf_pipeline.rewards.sequence_classification import SequenceClassificationOptions
    from rlhf_pipeline.preferences import split_preferences
    from rlhf_pipeline.rewards.sequence_classification import load_reward_model
    from rlhf_pipeline.training import train_policy
    from test_reward_model import _prefs

    _, tok = tiny_policy
    split = split_preferences(tok, _prefs(12), RewardModelParams(val_size=2, max_tokens=200), 0)
    task = RewardModelTask(*split.train, tok.pad_token_id, None, "pairs")
    cfg = RewardModelParams(learning_rate=2e-2, epochs=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                            warmup_ratio=0.0, save_every=100, dtype="float32", lora={"r": 4, "alpha": 8, "dropout": 0.0})
    heldout = {}
    rows, summary = train_policy(tiny_model_dir, task, cfg, 0, tmp_path / "rm", tmp_path / "ckpt", "f", progress=False,
                                 evaluate=lambda m: heldout.update(task.heldout_metrics(m, 4, 200, 2, 0)) or {})
    assert rows[-1]["loss"] < rows[0]["loss"] and heldout["accuracy"] == 1.0
    adapter = json.loads((tmp_path / f"rm/{ADAPTER_DIR}/adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    # The merged folder is a plain sequence-classification model with the trained head: the same
    # held-out accuracy as the adapter-wrapped model had.
    model, _ = load_reward_model(SequenceClassificationOptions(model=str(tmp_path / "rm"), dtype="float32"), CPU)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert task.heldout_metrics(model, 4, 200, 2, 0)["accuracy"] == 1.0


def test_killed_lora_training_with_dropout_resumes_to_the_same_bytes(tmp_path, tiny_model_dir, tiny_policy):
    updates = 30

    def project(name):
        root = stage_dir(tmp_path / name, tiny_model_dir, tiny_policy, updates)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["train"]["lora"] = {"r": 4, "alpha": 8, "dropout": 0.2}  # dropout draws from the RNG checkpointed
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        return root

    cmd = [sys.executable, *TRAIN]
    whole = project("whole")
    subprocess.run(cmd, cwd=whole, env=stage_env(), check=True, capture_output=True)
    cut = project("cut")
    kill_at_first_checkpoint_then_resume(cmd, cut)
    assert 0 < json.loads((cut / "metrics/train.json").read_text())["resumed_from_update"] < updates
    for f in ("model.safetensors", f"{ADAPTER_DIR}/adapter_model.safetensors"):
        assert (cut / "models/policy" / f).read_bytes() == (whole / "models/policy" / f).read_bytes(), f
