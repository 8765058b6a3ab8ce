"""ref_logprobs: reference policy + pairs -> the reference's log-probs of every pair (computed once).

The reference is ``train.reference``: ``previous`` (π_t, the policy the pairs were sampled from:
REBEL, Algorithm 1) or ``base`` (π0). Training then holds one model in memory, and changing η or
the learning rate reuses these.
"""

import time

import pyarrow as pa
import torch

from rlhf_pipeline.cli import peak_rss_mb, run_stage, stage_args
from rlhf_pipeline.logprobs import check_context_length, pair_logprobs
from rlhf_pipeline.models import default_device, load_policy, load_tokenizer, resolve_dtype
from rlhf_pipeline.outputs import output_group, read_parquet, write_json, write_parquet
from rlhf_pipeline.params import load_params
from rlhf_pipeline.schemas import PAIRS, REF_LOGPROBS, columns


def main(argv=None) -> None:
    args = stage_args(argv, __doc__, "previous", "base", "pairs", "out", "metrics")
    params = load_params()
    reference = args.previous if params.train.reference == "previous" else args.base
    pairs = read_parquet(args.pairs, columns(PAIRS, "prompt_id", "prompt_ids", "chosen_ids", "rejected_ids"))
    prompts, chosen, rejected = (pairs.column(c).to_pylist() for c in ("prompt_ids", "chosen_ids", "rejected_ids"))
    tok = load_tokenizer(reference)
    device = default_device()
    dtype = resolve_dtype(params.train.dtype, device)
    model = load_policy(reference, torch.float32, device)
    check_context_length([len(p) + max(len(c), len(r)) for p, c, r in zip(prompts, chosen, rejected)],
                         getattr(model.config, "max_position_embeddings", None), args.pairs)
    t0 = time.perf_counter()
    ref_c, ref_r = pair_logprobs(model, prompts, chosen, rejected, tok.pad_token_id, params.logprob_temperature(),
                                 params.train.logprob_batch_size, None if dtype == torch.float32 else dtype)
    seconds = time.perf_counter() - t0
    tokens = sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(prompts, chosen, rejected))
    table = pa.table({"prompt_id": pairs.column("prompt_id"), "chosen_logprob": ref_c, "rejected_logprob": ref_r},
                     schema=REF_LOGPROBS)
    metrics = {"reference": params.train.reference, "reference_policy": str(reference), "pairs": pairs.num_rows,
               "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1),
               "mean_chosen_logprob": sum(ref_c) / len(ref_c), "mean_rejected_logprob": sum(ref_r) / len(ref_r),
               "dtype": str(dtype).removeprefix("torch."), "peak_rss_mb": peak_rss_mb()}
    with output_group():
        write_parquet(table, args.out)
        write_json(metrics, args.metrics)


if __name__ == "__main__":
    run_stage(main)
