"""Supervised fine-tuning: demonstrations in the Alpaca and chat formats, their tokenization in the
policy's chat template, and the SFT task on the one training loop (a tiny model learns them)."""

import json

import pytest
import torch

from rlhf_pipeline.demonstrations import load_alpaca_eval, load_file, split_demonstrations, to_messages, tokenize
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
                                 progress=False, evaluate=lambda policy: {"val_loss_after": task.heldout_loss(policy, 3)})
    assert summary["objective"] == "sft" and summary["updates"] == 16
    after = nll_per_token(load_policy(tmp_path / "sft", torch.float32, torch.device("cpu")))
    assert summary["val_loss_after"] == pytest.approx(after, rel=1e-5)  # the saved policy is the one evaluated
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
    with pytest.raises(ValueError, match="path: required when source is 'file'"):
        SftParams(source="file")
    with pytest.raises(ValueError, match="dataset: required when source is 'huggingface'"):
        SftParams(source="huggingface")
    with pytest.raises(ValueError, match="val_size: 8 leaves nothing to train on out of num_demonstrations=8"):
        SftParams(num_demonstrations=8, val_size=8)
    assert SftParams().source == "alpaca_eval"


def _records(n):
    words = ["apple", "river", "stone", "cloud", "green", "seven", "table", "music", "light", "paper", "glass", "sugar"]
    return [{"instruction": f"Repeat the word {w}.", "output": f"{w} {w} {w}"} for w in words[:n]]


def test_split_is_seeded_independent_of_row_order_and_counts_what_it_drops(tiny_policy):
    _, tok = tiny_policy
    records = _records(10)
    convs = [to_messages(r, "r") for r in records]
    long = to_messages({"instruction": "Say it all.", "output": " ".join(["word"] * 200)}, "r")
    cfg = SftParams(num_demonstrations=8, val_size=3, max_tokens=100)
    split = split_demonstrations(tok, [*convs, convs[0], long], cfg, 5, "demos")
    assert split.counts == {"source_rows": 12, "dropped_too_long": 1, "dropped_control_tokens": 0, "duplicates_dropped": 1,
                            "train_demonstrations": 5, "val_demonstrations": 3,
                            "train_response_tokens": sum(map(len, split.train[1]))}
    tokenized = {tuple(map(tuple, tokenize(tok, c, "r"))) for c in convs}
    assert {(tuple(p), tuple(r)) for p, r in zip(*split.train)} <= tokenized
    again = split_demonstrations(tok, [long, *reversed(convs)], cfg, 5, "demos")
    assert (again.train, again.val) == (split.train, split.val) and again.digest() == split.digest()
    other = split_demonstrations(tok, convs, cfg, 6, "demos")
    assert other.val != split.val
    held_out = {tuple(r) for r in split.val[1]}
    assert not held_out & {tuple(r) for r in split.train[1]}
    with pytest.raises(PipelineError, match=r"sft.num_demonstrations: 11 requested but distinct demonstrations of "
                                            r"demos within sft.max_tokens=100 \(1 longer\): 10"):
        split_demonstrations(tok, [*convs, long], SftParams(num_demonstrations=11, max_tokens=100, val_size=3),
                             5, "demos")


def test_a_dataset_source_under_the_sources_folder(tmp_path):
    from rlhf_pipeline.demonstrations import load_source

    sources = tmp_path / "sources"
    sources.mkdir()
    path = sources / "alpaca.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _records(3)) + "\n")
    cfg = SftParams(source="huggingface", dataset="json", data_files=str(path))
    convs, facts = load_source(cfg, sources)
    assert convs == [to_messages(r, "r") for r in _records(3)] and facts["dataset_rows"] == 3
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text(path.read_text())
    with pytest.raises(PipelineError, match="sft.data_files: .* outside"):
        load_source(SftParams(source="huggingface", dataset="json", data_files=str(outside)), sources)
    path.write_text(json.dumps({"instruction": "Say hi", "output": ""}) + "\n")
    with pytest.raises(PipelineError, match=r"split 'train': row 0: field 'output' is empty"):
        load_source(cfg, sources)


def test_heldout_loss_is_the_sft_loss_over_all_demonstrations(tiny_policy):
    from rlhf_pipeline.losses import sft_loss

    model, tok = tiny_policy
    prompts, responses = map(list, zip(*(tokenize(tok, to_messages(r, "r"), "r") for r in _records(5))))
    task = SftTask(prompts, responses, tok.pad_token_id, "demos")
    with torch.no_grad():
        whole, _ = task.forward(model.eval(), list(range(5)))
    assert task.heldout_loss(model, 2) == pytest.approx(whole.item(), rel=1e-5)
    assert whole.item() == pytest.approx(sft_loss(torch.tensor(response_logprobs(
        model, prompts, responses, tok.pad_token_id, 1.0, 8, progress=False)), torch.tensor(
        [float(len(r)) for r in responses])).item(), rel=1e-5)


def _candidate(idx, text, reward, finish="stop"):
    from rlhf_pipeline.pairs import Candidate

    return Candidate(idx, text, reward, [], finish)


def test_rejection_sampling_keeps_each_prompts_best_complete_response_above_the_threshold():
    from rlhf_pipeline.demonstrations import rejection_sampling

    prompts = {"a": "Say hi.", "b": "Count to 3.", "c": "Name a colour.", "d": "Be brief."}
    responses = {
        "b": [_candidate(0, "1 2", 0.5), _candidate(1, "1 2 3", 1.0), _candidate(2, "one two three", 1.0)],
        "a": [_candidate(0, "hi", 0.25), _candidate(1, "hello there", 0.75)],
        "c": [_candidate(0, "red", 0.0), _candidate(1, "blue blue blue", 2.0, "length")],  # best is cut: never kept
        "d": [_candidate(0, "ok", 1.0, "length")],
    }
    convs, facts = rejection_sampling(responses, prompts, 0.75, "gens")
    # prompt_id order; ties to the lowest response_idx; the prompt's chat turns, then the response
    assert convs == [[{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hello there"}],
                     [{"role": "user", "content": "Count to 3."}, {"role": "assistant", "content": "1 2 3"}]]
    assert facts == {"source_prompts": 4, "prompts_below_min_reward": 1, "prompts_without_complete_response": 1}
    with pytest.raises(PipelineError, match=r"sft.min_reward: no prompt of gens .* reward >= 1.5 \(best: 1.0\)"):
        rejection_sampling(responses, prompts, 1.5, "gens")
    with pytest.raises(PipelineError, match="gens: prompt 'a' is not among the prompts"):
        rejection_sampling(responses, {"b": "x"}, 0.0, "gens")


def test_sft_stage_on_its_own_best_responses(tiny_model_dir, tmp_path):
    """The stage with sft.source rejection_sampling: iteration 1's best responses become the
    demonstrations it trains on; the metrics count what was kept."""
    import shutil
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    from conftest import REPO, stage_env
    from rlhf_pipeline.schemas import GENERATIONS, PROMPTS, SCORES

    shutil.copytree(tiny_model_dir, tmp_path / "models/base")
    (tmp_path / "stages").symlink_to(REPO / "stages")
    (tmp_path / "data/sources").mkdir(parents=True)
    n = 12
    pq.write_table(pa.Table.from_pylist([{"prompt_id": f"p{i:02d}", "prompt": f"Repeat {i}."} for i in range(n)],
                                        schema=PROMPTS), tmp_path / "data/prompts.parquet")
    gens = [{"prompt_id": f"p{i:02d}", "response_idx": k, "response": f"{i} " * (k + 1), "num_tokens": k + 2,
             "finish_reason": "stop", "seed": k, "token_ids": [5] * (k + 2)} for i in range(n) for k in range(2)]
    pq.write_table(pa.Table.from_pylist(gens, schema=GENERATIONS), tmp_path / "data/generations.parquet")
    scores = [{"prompt_id": g["prompt_id"], "response_idx": g["response_idx"],
               "reward": float(g["response_idx"] == 1 and int(g["prompt_id"][1:]) < 10)} for g in gens]
    pq.write_table(pa.Table.from_pylist(scores, schema=SCORES), tmp_path / "data/scores.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["sft"].update(source="rejection_sampling", min_reward=1.0, num_demonstrations=None, val_size=2,
                         learning_rate=1e-3, dtype="float32", per_device_eval_batch_size=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.sft", "--policy", "models/base", "--sources", "data/sources", "--prompts",
           "data/prompts.parquet", "--generations", "data/generations.parquet", "--scores", "data/scores.parquet",
           "--out", "models/sft", "--metrics", "metrics/sft.json", "--log", "metrics/sft.tsv"]
    subprocess.run(cmd, cwd=tmp_path, env=stage_env(), check=True, capture_output=True)
    metrics = json.loads((tmp_path / "metrics/sft.json").read_text())
    assert (metrics["source_prompts"], metrics["prompts_below_min_reward"]) == (n, 2)
    assert (metrics["train_demonstrations"], metrics["val_demonstrations"]) == (8, 2)
    assert metrics["updates"] == 2 and (tmp_path / "models/sft/model.safetensors").is_file()
