"""pairs: generations + scores + prompts + tokenizer -> chosen/rejected pairs (token ids as sampled)."""

from rlhf_pipeline.cli import run_stage, stage_args
from rlhf_pipeline.models import load_tokenizer
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.pairs import build_pairs, join_scores
from rlhf_pipeline.params import load_params
from rlhf_pipeline.schemas import GENERATIONS, PROMPTS, SCORES, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "tokenizer", "prompts", "generations", "scores", "out", "metrics")
    params = load_params()
    prompts = read_parquet(args.prompts, columns(PROMPTS))
    gens = read_parquet(args.generations, columns(GENERATIONS, "prompt_id", "response_idx", "response", "token_ids",
                                                  "finish_reason"))
    scores = read_parquet(args.scores, columns(SCORES))
    responses = join_scores(gens, scores, args.generations, args.scores)
    texts = dict(zip(prompts.column("prompt_id").to_pylist(), prompts.column("prompt").to_pylist()))
    table, counts = build_pairs(responses, texts, load_tokenizer(args.tokenizer), params.pairs)
    with output_group():
        write_parquet(table, args.out)
        write_json(counts, args.metrics)


if __name__ == "__main__":
    run_stage(main)
