"""Online RL on a tiny policy: each algorithm raises the reward of a trivially learnable task
(reward 1 when the response contains a given word), checkpoints resume to the same bytes, and the
stage writes its rollouts."""

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.online import OnlineTask, PolicyAndValue
from rlhf_pipeline.params import OnlineParams
from rlhf_pipeline.registry import ONLINE_ALGORITHMS
from rlhf_pipeline.schemas import ROLLOUTS
from rlhf_pipeline.training import inputs_fingerprint, train_policy

#: the decoded token the peaked tiny policy samples in about a quarter of its 8-token responses
TARGET = " Intake"
PROMPTS = pa.table({"prompt_id": [f"p{i}" for i in range(8)],
                    "prompt": [f"Prompt number {i}: write something." for i in range(8)]})


class ContainsTarget:
    """A scorer set with one verifiable reward: 1.0 when the response contains ``target``."""

    def __init__(self, target: str = TARGET):
        self.target = target
        self.scorers = [(SimpleNamespace(name="contains", weight=1.0), self)]

    def validate(self, prompts, where):
        pass

    def score(self, by_id, texts, progress):
        return {"reward_contains": pa.array([float(self.target in text) for _, text in texts], pa.float64())}, {}


@pytest.fixture(scope="module")
def peaked_policy_dir(raw_tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny policy whose next-token distributions are peaked (weights drawn with std 1.0, not
    0.02): a handful of tokens carry most of the mass, so a reward on one of them is learnable in a
    few steps."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from conftest import tiny_llama_config
    from rlhf_pipeline.models import prepare_base_model

    raw = tmp_path_factory.mktemp("peaked_raw")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(initializer_range=1.0)).save_pretrained(raw)
    AutoTokenizer.from_pretrained(raw_tiny_model_dir).save_pretrained(raw)
    out = tmp_path_factory.mktemp("peaked") / "base"
    prepare_base_model(str(raw), out)
    return out


def online_cfg(**overrides) -> OnlineParams:
    cfg = dict(rollout_steps=6, prompts_per_step=4, num_responses=4, num_ppo_epochs=2, max_new_tokens=8,
               temperature=1.0, top_p=1.0, generation_batch_size=16, logprob_batch_size=8, learning_rate=1e-3,
               per_device_train_batch_size=4, gradient_accumulation_steps=2, save_every=2, dtype="float32",
               weight_decay=0.0)
    cfg.update(overrides)
    return OnlineParams(**cfg)


ALGORITHMS = {"ppo": {"name": "ppo", "kl_coef": 0.01, "kl_target": 1.0, "kl_horizon": 100, "vf_coef": 0.5},
              "rloo": {"name": "rloo", "kl_coef": 0.01},
              "grpo": {"name": "grpo", "beta": 0.01},
              "rebel": {"name": "rebel", "eta": 1.0, "kl_coef": 0.01}}


def make_task(model_dir, key: str, cfg: OnlineParams) -> OnlineTask:
    from rlhf_pipeline.models import load_policy, load_tokenizer

    reference = load_policy(model_dir, torch.float32, torch.device("cpu"))
    objective = ONLINE_ALGORITHMS.build(cfg.algorithms[key], f"online.algorithms.{key}")
    return OnlineTask(objective, PROMPTS, load_tokenizer(model_dir), reference,
                      ContainsTarget(), cfg, missing_eos_penalty=None, seed=11, where="test prompts")


def run(model_dir, out: Path, key: str, **overrides):
    cfg = online_cfg(algorithms={key: ALGORITHMS[key]}, **overrides)
    task = make_task(model_dir, key, cfg)
    train_cfg = cfg.model_copy(update={"total_episodes": task.total_episodes()})
    fingerprint = inputs_fingerprint([Path(model_dir) / "model.safetensors"], cfg, 11, cfg.temperature)
    rows, summary = train_policy(model_dir, task, train_cfg, 11, out / "policy", out / "ckpt", fingerprint,
                                 progress=False)
    return task, rows, summary


@pytest.mark.parametrize("key", sorted(ALGORITHMS))
def test_each_algorithm_raises_a_learnable_reward(peaked_policy_dir, tmp_path, key):
    task, rows, summary = run(peaked_policy_dir, tmp_path, key)
    table = task.rollouts_table()
    assert table.schema == ROLLOUTS and table.num_rows == 6 * 4 * 4
    by_step = {}
    for step, reward in zip(table.column("step").to_pylist(), table.column("reward").to_pylist()):
        by_step.setdefault(step, []).append(reward)
    means = [sum(v) / len(v) for _, v in sorted(by_step.items())]
    print(key, [round(m, 3) for m in means])
    assert means[-1] > means[0] + 0.3 and means[-1] >= 0.6, means
    per_step = 2 * 16 // (4 * 2) // task.objective.responses_per_example
    assert len(rows) == 6 * per_step and task.summary()["responses_generated"] == 96
    assert [r["reward"] for r in rows[::per_step]] == pytest.approx(means)
    for name in task.metric_names:
        assert all(torch.isfinite(torch.tensor(r[name])) for r in rows), name


def test_policy_and_value_read_values_where_the_logits_of_each_token_are(tiny_model_dir, tiny_policy):
    from rlhf_pipeline.logprobs import token_logprobs, token_logprobs_and_values
    from rlhf_pipeline.online import load_value_model

    policy, tok = tiny_policy
    torch.manual_seed(0)
    critic = load_value_model(tiny_model_dir, torch.float32, torch.device("cpu"))
    assert all(int(torch.count_nonzero(p.detach())) == 0 for p in critic.score.parameters())  # V = 0 at first
    with torch.no_grad():
        critic.score.weight.normal_()
    both = PolicyAndValue(policy, critic)
    prompts, responses = [[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21, 22], [23]]
    with torch.no_grad():
        logps, values, mask = token_logprobs_and_values(both, prompts, responses, tok.pad_token_id, 0.7)
        want_logps, want_mask = token_logprobs(policy, prompts, responses, tok.pad_token_id, 0.7)
        # V(s_t) is the critic's output at the last token before y_t: row 0's prompt ends at position 2
        full = critic(input_ids=torch.tensor([prompts[0] + responses[0]])).logits[0, :, 0]
    torch.testing.assert_close(logps, want_logps)
    assert mask.tolist() == want_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    torch.testing.assert_close(values[0], full[2:5])
    assert values[1, 1:].abs().sum() == 0


def test_gradient_checkpointing_recomputes_both_models_activations(tiny_model_dir):
    """online.gradient_checkpointing keeps no MLP activation of the policy or the critic for the
    backward pass (they are recomputed): what bounds the PPO update's memory on long prompts."""
    from rlhf_pipeline.logprobs import token_logprobs_and_values
    from rlhf_pipeline.models import load_policy, load_tokenizer
    from rlhf_pipeline.online import load_value_model

    cpu = torch.device("cpu")
    policy, tok = load_policy(tiny_model_dir, torch.float32, cpu), load_tokenizer(tiny_model_dir)
    both = PolicyAndValue(policy, load_value_model(tiny_model_dir, torch.float32, cpu)).train()
    width = policy.config.intermediate_size
    prompts, responses = [[5, 6, 7], [8, 9, 10, 11, 12]], [[20, 21, 22], [23]]

    def kept_mlp_activations() -> int:
        kept = []

        def pack(t):
            kept.append(t.shape[-1] == width)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps, values, _ = token_logprobs_and_values(both, prompts, responses, tok.pad_token_id, 1.0)
        (logps.sum() + values.sum()).backward()
        return sum(kept)

    assert kept_mlp_activations() >= 2 * policy.config.num_hidden_layers
    both.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert kept_mlp_activations() == 0


def test_ppo_gives_the_same_updates_with_gradient_checkpointing(peaked_policy_dir, tmp_path):
    from safetensors.torch import load_file

    runs = [run(peaked_policy_dir, tmp_path / str(gc), "ppo", rollout_steps=1, gradient_checkpointing=gc)
            for gc in (False, True)]
    timing = {"seconds", "tokens_per_second"}
    (plain, _, _), (checkpointed, _, _) = runs
    rows = [[{k: v for k, v in row.items() if k not in timing} for row in r[1]] for r in runs]
    # recomputing a layer's forward on CPU repeats its arithmetic: the same figures and weights, exactly
    assert len(rows[0]) == 4 and rows[0] == rows[1]
    assert plain.rollouts_table().column("token_ids") == checkpointed.rollouts_table().column("token_ids")
    weights = [load_file(tmp_path / str(gc) / "policy" / "model.safetensors") for gc in (False, True)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[1][name], weights[0][name]) for name in weights[0])


def test_online_params_reject_an_odd_number_of_responses_for_rebel():
    def check(name):
        cfg = online_cfg(num_responses=3, algorithms={name: {"name": name}})
        ONLINE_ALGORITHMS.build(cfg.algorithms[name], f"online.algorithms.{name}").check_setting(cfg, name)

    with pytest.raises(PipelineError, match="online.num_responses: rebel .* pairs a prompt's responses"):
        check("rebel")
    check("grpo")  # an odd k is fine for the others


ONLINE_TRAIN = ["-m", "stages.online_train", "--algorithm", "ppo", "--policy", "models/base", "--reference",
                "models/base", "--prompts", "data/prompts/train.parquet", "--out", "online/models/ppo",
                "--rollouts", "online/data/ppo/rollouts.parquet", "--metrics", "online/metrics/ppo/train.json",
                "--log", "online/metrics/train_log/ppo.tsv"]


def online_stage_dir(root: Path, model_dir, reward_model_dir, **online) -> Path:
    """A project folder with models/base, train prompts and params for the online_train stage; the
    reward is the tiny reward model's score."""
    import shutil

    import pyarrow.parquet as pq
    import yaml

    from conftest import REPO

    shutil.copytree(model_dir, root / "models/base")
    (root / "data/prompts").mkdir(parents=True)
    pq.write_table(PROMPTS, root / "data/prompts/train.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["seed"] = 5
    params["reward"] = {"scorers": [{"name": "sequence-classification", "weight": 1.0,
                                     "options": {"model": str(reward_model_dir), "dtype": "float32"}}],
                        "missing_eos_penalty": 0.5}
    params["online"].update({"algorithms": {"ppo": ALGORITHMS["ppo"]}, "rollout_steps": 3, "prompts_per_step": 2,
                             "num_responses": 2, "num_ppo_epochs": 2, "max_new_tokens": 6,
                             "generation_batch_size": 4, "logprob_batch_size": 2, "learning_rate": 1e-3,
                             "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "save_every": 1,
                             **online})
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    (root / "stages").symlink_to(REPO / "stages")
    return root


def test_the_stage_resumes_after_sigkill_to_the_same_bytes(tmp_path, peaked_policy_dir, tiny_reward_model_dir):
    import json
    import subprocess
    import sys

    import pyarrow.parquet as pq
    from safetensors import safe_open

    from conftest import stage_env
    from test_training import kill_at_first_checkpoint_then_resume

    cmd = [sys.executable, *ONLINE_TRAIN]
    whole = online_stage_dir(tmp_path / "whole", peaked_policy_dir, tiny_reward_model_dir)
    subprocess.run(cmd, cwd=whole, env=stage_env(), check=True, capture_output=True)
    cut = online_stage_dir(tmp_path / "cut", peaked_policy_dir, tiny_reward_model_dir)
    kill_at_first_checkpoint_then_resume(cmd, cut, "online/models/.checkpoints/ppo", "online/models/ppo")

    metrics = json.loads((cut / "online/metrics/ppo/train.json").read_text())
    assert metrics["updates"] == 3 * 2 * 2 and 0 < metrics["resumed_from_update"] < 12
    assert metrics["responses_generated"] == 12 and metrics["algorithm"] == "ppo"
    for path in ("online/models/ppo/model.safetensors", "online/data/ppo/rollouts.parquet"):
        assert (cut / path).read_bytes() == (whole / path).read_bytes(), path
    log = (cut / "online/metrics/train_log/ppo.tsv").read_text().splitlines()
    assert len(log) == 13 and {"reward", "kl", "entropy", "clip_fraction", "approx_kl", "value_loss",
                               "explained_variance", "response_length", "beta"} <= set(log[0].split("\t"))
    rollouts = pq.read_table(cut / "online/data/ppo/rollouts.parquet")
    assert rollouts.schema == ROLLOUTS and rollouts.column("step").to_pylist() == [0] * 4 + [1] * 4 + [2] * 4
    # the missing-EOS penalty is in the reward the objective saw, not in the score
    cut_short = [f == "length" for f in rollouts.column("finish_reason").to_pylist()]
    assert any(cut_short)
    assert [r - s for r, s in zip(rollouts.column("reward").to_pylist(), rollouts.column("score").to_pylist())] == \
        pytest.approx([-0.5 if c else 0.0 for c in cut_short])
    # the saved model is the policy alone, as the base: the critic stays in the checkpoints
    with safe_open(str(cut / "online/models/ppo/model.safetensors"), "pt") as f, \
            safe_open(str(peaked_policy_dir / "model.safetensors"), "pt") as g:
        assert set(f.keys()) == set(g.keys())
    assert not (cut / "online/models/.checkpoints").exists() or not any((cut / "online/models/.checkpoints").iterdir())


def test_the_stage_rejects_a_minibatch_that_does_not_divide_a_step(tmp_path, peaked_policy_dir, tiny_reward_model_dir):
    import subprocess
    import sys

    from conftest import stage_env

    root = online_stage_dir(tmp_path, peaked_policy_dir, tiny_reward_model_dir, per_device_train_batch_size=3)
    proc = subprocess.run([sys.executable, *ONLINE_TRAIN], cwd=root, env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 1
    assert "online.per_device_train_batch_size: a minibatch of 3 examples" in proc.stderr
    assert not (root / "online").exists()
    bad = [*ONLINE_TRAIN]
    bad[bad.index("ppo")] = "dpo"
    proc = subprocess.run([sys.executable, *bad], cwd=root, env=stage_env(), capture_output=True, text=True)
    assert proc.returncode == 1 and "online.algorithms: no algorithm 'dpo' (there are ppo)" in proc.stderr
