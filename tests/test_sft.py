"""Supervised fine-tuning: demonstrations in the Alpaca and chat formats, their tokenization in the
policy's chat template, and the SFT task on the one training loop (a tiny model learns them)."""

import json

import pytest
import torch

from rlhf_pipeline.demonstrations import load_alpaca_eval, load_file, to_messages, tokenize
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.logprobs import response_logprobs
from rlhf_pipeline.objectives import SftTask
from rlhf_pipeline.params import SftParams
from rlhf_pipeline.training import train_policy


def test_alpaca_and_chat_records_become_messages():
    assert to_messages({"instruction": "Add.", "input": "2 + 2", "output": "4"}, "r") == [
        {"role": "user", "content": "Add.\n\n2 + 2"}, {"role": "assistant", "content": "4"}]
    assert to_messages({"instruction": "Hi.", "input": "", "output": "Hello."}, "r")[0]["content"] == "Hi."
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    assert to_messages({"messages": chat}, "r") == chat


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Say hi", "output": "  "}, "field 'output' is empty"),
    ({"instruction": "Say hi"}, "neither an Alpaca record"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, "ends with the assistant's"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, r"messages\[0\] must be"),
    ({"instruction": "Say hi", "input": 3, "output": "hi"}, "field 'input' is int"),
])
def test_bad_records_are_named(record, message):
    with pytest.raises(PipelineError, match=f"data.jsonl:7: .*{message}"):
        to_messages(record, "data.jsonl:7")


def test_files_in_each_format_and_errors_name_the_row(tmp_path):
    rows = [{"instruction": "Say hi", "output": "Hello!"}, {"instruction": "Count", "input": "1 2", "output": "3"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_file(tmp_path / "a.json") == load_file(tmp_path / "a.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"instruction": "x", "output": ""}))
    with pytest.raises(PipelineError, match=r"bad.jsonl:2: field 'output' is empty"):
        load_file(tmp_path / "bad.jsonl")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(PipelineError, match="no records"):
        load_file(tmp_path / "empty.json")
    with pytest.raises(PipelineError, match="outside"):
        load_file(tmp_path / "a.json", sources_dir=tmp_path / "sources")


def test_alpaca_eval_demonstrations_ship_in_the_wheel():
    demos = load_alpaca_eval()
    assert len(demos) == 805
    assert all(m[0]["role"] == "user" and m[-1]["role"] == "assistant" for m in demos)


def test_tokenized_demonstration_is_the_generation_prompt_plus_the_response_to_its_eos(tiny_policy):
    from rlhf_pipeline.chat import prompt_token_ids

    _, tok = tiny_policy
    prompt, response = tokenize(tok, to_messages({"instruction": "Say hi", "output": "Hello there!"}, "r"), "r")
    assert prompt == prompt_token_ids(tok, "Say hi")  # exactly what generate samples after
    assert response[-1] == tok.eos_token_id and tok.eos_token_id not in response[:-1]
    assert tok.decode(response[:-1]) == "Hello there!"


def test_sft_task_rejects_empty_input():
    with pytest.raises(PipelineError, match="no demonstrations"):
        SftTask([], [], 0, "demos")
    with pytest.raises(PipelineError, match="demos: row 1 has an empty response"):
        SftTask([[1, 2], [1]], [[3], []], 0, "demos")


def test_policy_learns_the_demonstrations(tiny_policy, tiny_model_dir, tmp_path):
    from rlhf_pipeline.models import load_policy

    model, tok = tiny_policy
    records = [{"instruction": f"Repeat the word {w}.", "output": f"{w} {w} {w}"}
               for w in ("apple", "river", "stone", "cloud", "green", "seven", "table", "music")]
    prompts, responses = map(list, zip(*(tokenize(tok, to_messages(r, "r"), "r") for r in records)))
    task = SftTask(prompts, responses, tok.pad_token_id, "demos")
    cfg = SftParams(learning_rate=1e-2, epochs=8, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                    warmup_ratio=0.0, save_every=100, dtype="float32")

    def nll_per_token(m):
        lp = response_logprobs(m, prompts, responses, tok.pad_token_id, 1.0, 8, progress=False)
        return -sum(lp) / sum(map(len, responses))

    before = nll_per_token(model)
    with torch.no_grad():  # the task's loss: NLL per response token, the prompt only as context
        loss, figures = task.forward(model, list(range(len(records))))
    assert loss.item() == pytest.approx(before, rel=1e-5) and figures.numel() == 0
    rows, summary = train_policy(tiny_model_dir, task, cfg, 0, tmp_path / "sft", tmp_path / "ckpt", "f",
                                 progress=False)
    assert summary["objective"] == "sft" and summary["updates"] == 16
    after = nll_per_token(load_policy(tmp_path / "sft", torch.float32, torch.device("cpu")))
    assert after < 0.5 * before, (before, after)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_demonstration_over_the_context_is_an_error_before_training(tiny_policy, tiny_model_dir, tmp_path):
    _, tok = tiny_policy
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(tiny_model_dir).max_position_embeddings
    task = SftTask([[1] * context], [[2, tok.eos_token_id]], tok.pad_token_id, "demos")
    cfg = SftParams(per_device_train_batch_size=1, gradient_accumulation_steps=1, dtype="float32")
    with pytest.raises(PipelineError, match=r"demos: row 0 has .* more than the model's context .*\(lower sft.max_tokens\)"):
        train_policy(tiny_model_dir, task, cfg, 0, tmp_path / "sft", tmp_path / "ckpt", "f", progress=False,
                     where="demos")
    assert not (tmp_path / "sft").exists()


def test_params_need_the_source_they_name():
    with pytest.raises(ValueError, match="sft.source: file needs sft.path"):
        SftParams(source="file")
    assert SftParams().source == "alpaca_eval"
