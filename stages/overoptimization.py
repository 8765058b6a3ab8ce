"""overoptimization: the learned reward model + evaluated policies -> proxy and gold gains over π0.

Scores the validation responses of π0 and of each evaluated policy (the SFT policy, REBEL against
the learned reward, REBEL against IFEval itself) with the reward model, and sets its gains beside
IFEval's on the same responses and each policy's KL (Gao, Schulman & Hilton 2022): does optimising
the learned reward raise the true one, and where does it stop doing so?
"""

import pyarrow as pa

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import read_parquet, write_json
from rlhf_pipeline.params import load_params
from rlhf_pipeline.rewards import reward_column, score_responses
from rlhf_pipeline.learned_reward import PROXY, proxy_and_gold, proxy_params

#: Option -> the policy's name in the metrics.
POLICIES = {"sft": "sft", "rl": "rebel_learned_reward", "rebel": "rebel_ifeval"}
GOLD = "reward_ifeval"


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "reward-model", *POLICIES, "metrics")
    params = load_params()
    need = {"prompt_id": None, "response_idx": None, "prompt": None, "base_response": None, "trained_response": None, "kl": None,
            f"base_{GOLD}": None, f"trained_{GOLD}": None}
    tables = {option: read_parquet(getattr(args, option), need) for option in POLICIES}
    prompts: dict[str, dict] = {}
    texts: set[tuple[str, str]] = set()
    for table in tables.values():
        for row in table.select(["prompt_id", "prompt", "base_response", "trained_response"]).to_pylist():
            if prompts.setdefault(row["prompt_id"], row)["prompt"] != row["prompt"]:
                raise PipelineError(f"prompt {row['prompt_id']} has two different texts across the evaluation tables")
            texts |= {(row["prompt_id"], row["base_response"]), (row["prompt_id"], row["trained_response"])}
    unique = sorted(texts)  # π0's responses are in every table: each distinct text is scored once
    scored, facts = score_responses([(pid, i, text) for i, (pid, text) in enumerate(unique)],
                                    _prompt_table(prompts), proxy_params(args.reward_model), where=args.reward_model)
    proxy = dict(zip(unique, scored.column(reward_column(PROXY)).to_pylist()))
    metrics = {"reward_model": args.reward_model, "gold": GOLD, "responses_scored": len(unique),
               "seconds": facts[f"{PROXY}_seconds"]}
    for option, name in POLICIES.items():
        rows = tables[option].to_pylist()
        metrics[name] = {"table": getattr(args, option), **proxy_and_gold(
            tables[option], [proxy[(r["prompt_id"], r["base_response"])] for r in rows],
            [proxy[(r["prompt_id"], r["trained_response"])] for r in rows], GOLD,
            params.evaluate.bootstrap_samples, params.evaluate.confidence, params.seed)}
    write_json({**metrics, "peak_rss_mb": peak_rss_mb()}, args.metrics)


def _prompt_table(prompts: dict[str, dict]) -> pa.Table:
    ids = sorted(prompts)
    return pa.table({"prompt_id": ids, "prompt": [prompts[i]["prompt"] for i in ids]})


if __name__ == "__main__":
    run_stage(main)
