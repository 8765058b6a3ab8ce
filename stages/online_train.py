"""online_train: base policy + train prompts -> the policy trained online by one algorithm, and every
rollout step's responses (``online/dvc.yaml``: one stage per key of ``online.algorithms``).

``--algorithm KEY`` picks ``online.algorithms.KEY`` (ppo, rloo, grpo or rebel, with its keys). Each
rollout step samples the current policy on ``online.prompts_per_step`` train prompts (the project's
seeded sampler, seeds recorded), scores the responses with ``reward`` (missing-EOS penalty included),
takes per-token log-probs under the policy and π_ref (``--reference``), and the one training loop
optimises on them (``rlhf_pipeline.online``). The rollouts of every step go to ``--rollouts``
(``schemas.ROLLOUTS``: step, seed, response, reward, per-token log-probs, KL). Checkpoints hold the
policy, the critic (PPO), the optimizer, the KL controller and the rollouts: a killed run resumes to
the same weights. Under ``accelerate launch`` every process samples the same rollouts (same seeds)
and trains on its share of each minibatch.
"""

import hashlib
import json
from pathlib import Path

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, resolve_dtype
from rlhf_pipeline.online import OnlineTask
from rlhf_pipeline.outputs import read_parquet, write_parquet
from rlhf_pipeline.params import OnlineParams, check_plugins, load_params
from rlhf_pipeline.registry import ONLINE_ALGORITHMS
from rlhf_pipeline.rewards import Scorers
from rlhf_pipeline.schemas import PROMPTS, columns
from rlhf_pipeline.training import inputs_fingerprint, is_main_process, process_state, train_and_write


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "algorithm", "policy", "reference", "prompts", "out", "rollouts", "metrics",
                      "log")
    params = load_params()
    cfg = params.online
    if args.algorithm not in cfg.algorithms:
        raise PipelineError(f"online.algorithms: no algorithm {args.algorithm!r} (there are "
                            f"{', '.join(cfg.algorithms)})")
    check_plugins(params, objective=False, online=(args.algorithm,))  # its keys, by its own Params
    objective = ONLINE_ALGORITHMS.build(cfg.algorithms[args.algorithm], f"online.algorithms.{args.algorithm}")
    algorithm = objective.cfg  # defaults filled in
    prompts = read_parquet(args.prompts, columns(PROMPTS))
    scorers = Scorers(params.reward)
    scorers.validate(prompts, args.prompts)  # before any model is loaded
    world = process_state().num_processes
    minibatch = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * world
    per_step = objective.examples_per_step(cfg)
    if per_step % minibatch:
        unit = "pairs" if objective.responses_per_example == 2 else "responses"
        raise PipelineError(f"online.per_device_train_batch_size: a minibatch of {minibatch} examples "
                            f"(x gradient_accumulation_steps x {world} processes) must divide the {per_step} "
                            f"{unit} of a rollout step (prompts_per_step x num_responses)")
    if cfg.backend == "vllm" and world > 1:
        raise PipelineError(f"online.backend: vllm runs one engine beside one training process, not {world}; "
                            "use backend transformers with several processes")
    tok = load_tokenizer(args.policy)
    device = default_device()
    reference = load_policy(args.reference, resolve_dtype(cfg.dtype, device), device).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    engine = None
    if cfg.backend == "vllm":
        from rlhf_pipeline.generation import vllm_engine

        engine = vllm_engine(args.policy, cfg.dtype, params.seed,
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, in_process=True)
    task = OnlineTask(objective, prompts, tok, reference, scorers, cfg, params.reward.missing_eos_penalty,
                      params.seed, args.prompts, progress=is_main_process(), engine=engine)
    # this algorithm's settings only (a change to another's does not void this checkpoint), and the
    # episodes that the rollout keys give
    train_cfg = OnlineParams.model_validate({**cfg.model_dump(exclude={"algorithms"}),
                                             "algorithms": {args.algorithm: algorithm.model_dump()}}
                                            ).model_copy(update={"total_episodes": task.total_episodes()})
    reward = json.dumps(params.reward.model_dump(), sort_keys=True).encode()
    fingerprint = inputs_fingerprint([Path(args.policy) / "model.safetensors", Path(args.reference) / "model.safetensors",
                                      Path(args.prompts)], train_cfg, params.seed, cfg.temperature,
                                     data=hashlib.sha256(reward).digest())
    train_and_write(args.policy, task, train_cfg, params.seed, args.out, fingerprint, log_path=args.log,
                    metrics_path=args.metrics,
                    metrics=lambda summary: {"algorithm": args.algorithm, **algorithm.model_dump(), **summary,
                                             **task.summary()},
                    live_params={"seed": params.seed, "online": train_cfg.model_dump(), "algorithm": args.algorithm},
                    live_name=f"online_train@{args.algorithm}", where=args.prompts,
                    write_more=lambda: write_parquet(task.rollouts_table(), args.rollouts))


if __name__ == "__main__":
    run_stage(main)
