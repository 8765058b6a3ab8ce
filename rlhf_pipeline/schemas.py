"""The Arrow schema of every file the stages pass to each other; writers build tables with these,
readers check their inputs against them (``outputs.read_parquet(path, columns(SCHEMA, ...))``).

Prompt and score files carry further columns that depend on the source and the scorers (IFEval's
``instruction_id_list``, ``reward_<scorer>``); only their fixed columns are here.
"""

from __future__ import annotations

import pyarrow as pa

_IDS = pa.list_(pa.int32())

#: Prompt files (train, validation, test splits): fixed columns (sources add their own).
PROMPTS = pa.schema([("prompt_id", pa.string()), ("prompt", pa.string())])

#: ``generations.parquet``: one row per (prompt_id, response_idx); token ids exactly as sampled.
GENERATIONS = pa.schema([
    ("prompt_id", pa.string()),
    ("response_idx", pa.int32()),
    ("response", pa.string()),
    ("num_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("seed", pa.int64()),
    ("token_ids", _IDS),
])

#: ``scores.parquet``: fixed columns (each scorer adds ``reward_<name>`` and its extras).
SCORES = pa.schema([("prompt_id", pa.string()), ("response_idx", pa.int32()), ("reward", pa.float64())])

#: ``pairs.parquet``: one chosen/rejected pair per prompt.
PAIRS = pa.schema([
    ("prompt_id", pa.string()),
    ("prompt_ids", _IDS),
    ("chosen_ids", _IDS),
    ("rejected_ids", _IDS),
    ("chosen", pa.string()),
    ("rejected", pa.string()),
    ("chosen_reward", pa.float64()),
    ("rejected_reward", pa.float64()),
    ("chosen_response_idx", pa.int32()),
    ("rejected_response_idx", pa.int32()),
    ("chosen_finish_reason", pa.string()),
    ("rejected_finish_reason", pa.string()),
])

#: ``ref_logprobs.parquet``: the reference policy's summed log-probs (nats) of each pair, row for row.
REF_LOGPROBS = pa.schema([("prompt_id", pa.string()), ("chosen_logprob", pa.float64()),
                          ("rejected_logprob", pa.float64())])

#: an online stage's rollouts: one row per response of one rollout step (``rollouts.Rollouts.table``);
#: log-probs in nats, per token, in sampling order.
ROLLOUTS = pa.schema([
    ("step", pa.int32()),
    ("prompt_id", pa.string()),
    ("response_idx", pa.int32()),
    ("seed", pa.int64()),
    ("response", pa.string()),
    ("token_ids", _IDS),
    ("finish_reason", pa.string()),
    ("score", pa.float64()),           # the scorers' weighted sum
    ("reward", pa.float64()),          # less the missing-EOS penalty: what the objective sees
    ("logprobs", pa.list_(pa.float32())),
    ("ref_logprobs", pa.list_(pa.float32())),
    ("kl", pa.float64()),              # Σ_t (log πθ_old − log π_ref), the sequence log-ratio
])


def columns(schema: pa.Schema, *names: str) -> dict[str, pa.DataType]:
    """``{name: type}`` of the named columns of ``schema`` (all of them if none are named): what a
    reader requires of its input.

    Raises:
        KeyError: a name is not in the schema (a bug in the reader).
    """
    return {n: schema.field(n).type for n in (names or schema.names)}
