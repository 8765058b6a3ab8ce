"""The three DVC pipelines, one declaration per stage: ``python -m stages.dag`` writes ``dvc.yaml``,
``classic/dvc.yaml`` and ``online/dvc.yaml`` from them; ``python -m stages.dag --check`` fails if a
committed file differs from what the declarations give (``make dvc-yaml``; tests/test_dvc_deps.py).

A declaration names the stage module, its command line in order (each option's value an input, an
output, a metrics file or a plain argument), the params keys it reads and the comments a reader of
dvc.yaml needs. What is derived, never written by hand:

- the code deps: every project module the stage module can import, lazily imported ones and package
  ``__init__`` files included (:func:`code_deps`, from the import statements);
- the file deps and outputs: the paths on the command line, in its order;
- the optimiser keys: every field of ``params.OptimizerParams`` under the stage's section.

The REBEL iteration (generate → score → pairs → ref_logprobs → train) is declared once
(:func:`iteration_chain`) and instantiated by the default DAG (one ``foreach`` item per iteration) and
by the classic variant (``rl_*``: one iteration from the SFT policy against the learned reward).
"""

from __future__ import annotations

import argparse
import ast
import functools
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("rlhf_pipeline", "stages")
WIDTH = 112  # folded command lines wrap here


# ---- code deps: the import closure -------------------------------------------------------------

def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The project file of a dotted module name, or None for a third-party module.

    Raises:
        LookupError: ``name`` is under a project package but no such module exists.
    """
    if name.split(".")[0] not in PACKAGES:
        return None
    path = root / Path(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    raise LookupError(f"import of {name}: no such project module")


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Dotted names a module imports anywhere in its body, inside functions too (``from a import b``
    yields ``a`` and, when it is a module, ``a.b``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


@functools.lru_cache(maxsize=None)  # the same stage module serves several stages
def code_deps(stage_module: str, root: Path = ROOT) -> frozenset[str]:
    """Project files executed when ``stage_module`` runs (paths relative to ``root``): its import
    closure through the project packages, parent packages' ``__init__`` included."""
    seen: set[Path] = set()
    todo = [stage_module]
    while todo:
        name = todo.pop()
        try:
            path = module_file(name, root)
        except LookupError:
            if name.rsplit(".", 1)[0] and module_file(name.rsplit(".", 1)[0], root):
                continue  # `from package.module import function`: the function is not a module
            raise
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages' __init__
        todo += sorted(imported_modules(path, root))
    return frozenset(p.relative_to(root).as_posix() for p in seen)


# ---- plugins: the chosen file, through DVC templating ------------------------------------------

@dataclass(frozen=True)
class Plugin:
    """A registry (``rlhf_pipeline.registry``) whose chosen plugin a stage imports. ``registry``: its
    attribute name there; ``params_key``: where params.yaml names the choice (a plugin section, or a
    mapping or a list of them); ``template``: the choice's name as DVC's templating writes it in this
    stage, or None where it cannot (a list: DVC does not expand one in deps), which makes every
    built-in plugin's file a dep."""

    registry: str
    params_key: str
    template: str | None


OBJECTIVE = Plugin("OBJECTIVES", "train.objective", "${train.objective.name}")
ONLINE_ALGORITHM = Plugin("ONLINE_ALGORITHMS", "online.algorithms", "${item.name}")
#: Every stage that imports ``rlhf_pipeline.rewards`` (``Scorers``) runs the scorers of the list
#: ``reward.scorers``: all built-in scorer files are its deps (:func:`stage_code_deps`).
SCORER = Plugin("SCORERS", "reward.scorers", None)


def _chosen_names(plugin: Plugin, params: dict) -> list[str]:
    value = params
    for part in plugin.params_key.split("."):
        value = value[part]
    if isinstance(value, list):
        return [v["name"] for v in value]
    return [value["name"]] if "name" in value else [v["name"] for v in value.values()]


def plugin_deps(plugins: tuple[Plugin, ...], root: Path = ROOT, params: dict | None = None) -> set[str]:
    """Code deps of a stage that imports the chosen plugin of each of ``plugins`` (registries import
    them by name, which the import closure cannot see): the chosen plugin's file as a DVC template
    (``rlhf_pipeline/objectives/${train.objective.name}.py``), so that editing another plugin leaves
    the stage up to date; plus every module the registry's built-in plugins import (their shared
    code: losses, the base class), since a template cannot name those per plugin. Files listed in
    params.yaml's ``plugins`` (outside the package) are deps as listed, with their imports; when a
    chosen name is such an outside plugin's, every built-in plugin file is listed instead of the
    template (which would name a file that does not exist): rerun ``make dvc-yaml`` after choosing
    one. ``params``: the params mapping (default: ``root``'s params.yaml)."""
    import yaml

    from rlhf_pipeline import registry

    if params is None:
        params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    outside = [Path(p) for p in params.get("plugins") or []]
    deps: set[str] = set()
    for plugin in plugins:
        reg = getattr(registry, plugin.registry)
        folder = root / Path(*reg.package.split("."))
        builtin = reg.builtin_names()
        files = {f"{folder.relative_to(root).as_posix()}/{reg.module_stem(name)}.py" for name in builtin}
        for name in builtin:
            deps |= code_deps(f"{reg.package}.{reg.module_stem(name)}", root)
        if plugin.template is not None and all(name in builtin for name in _chosen_names(plugin, params)):
            deps -= files
            deps.add(f"{folder.relative_to(root).as_posix()}/{plugin.template}.py")
    for path in outside:
        deps.add(path.as_posix())
        for module in sorted(imported_modules(root / path, root)):
            deps |= code_deps(module, root)
    return deps


def stage_code_deps(stage: "Stage", root: Path = ROOT) -> list[str]:
    """Every code dep of ``stage``, sorted: its module's import closure (:func:`code_deps`) and its
    plugins' (:func:`plugin_deps`; :data:`SCORER` for every stage that imports the scorers' package)."""
    deps = set(code_deps(f"stages.{stage.module}", root))
    from rlhf_pipeline.registry import SCORERS

    plugins = stage.plugins
    if f"{SCORERS.package.replace('.', '/')}/__init__.py" in deps and SCORER not in plugins:
        plugins = (*plugins, SCORER)
    if plugins:
        deps |= plugin_deps(plugins, root)
    return sorted(deps)


# ---- declarations ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Opt:
    """One ``--option value`` of a stage's command line. ``role``: ``in`` (a dep), ``out`` (a cached
    output), ``plot`` (an uncached output, e.g. a TSV the plots read), ``metrics`` (an uncached metrics
    JSON), ``arg`` (neither: an iteration name, DVC's own lock file). ``note``: a comment beside it."""

    option: str
    value: str
    role: str = "arg"
    note: str = ""


def In(option: str, value: str, note: str = "") -> Opt:  # noqa: N802 (reads like a role in a table)
    return Opt(option, value, "in", note)


def Out(option: str, value: str, note: str = "") -> Opt:  # noqa: N802
    return Opt(option, value, "out", note)


def Plot(option: str, value: str, note: str = "") -> Opt:  # noqa: N802
    return Opt(option, value, "plot", note)


def Metrics(option: str, value: str) -> Opt:  # noqa: N802
    return Opt(option, value, "metrics")


def Arg(option: str, value: str) -> Opt:  # noqa: N802
    return Opt(option, value, "arg")


#: A params entry: a key, or (key, comment); ("#", text) is a comment line of its own.
Param = str | tuple[str, str]
ALL_PARAMS = ("params.yaml:", "every key: the run records them all")


@dataclass(frozen=True)
class Stage:
    name: str
    module: str                         # stages/<module>.py
    cmd: tuple[Opt, ...]
    params: tuple[Param, ...]
    comment: str = ""                   # above the stage
    inner_comment: str = ""             # first line inside it (inside `do:` for a foreach stage)
    extra_deps: tuple[tuple[str, str], ...] = ()  # (path, note): read but not on the command line
    foreach: str = ""                   # e.g. ${iterations}
    wdir: str = ""
    plugins: tuple[Plugin, ...] = ()    # registries whose chosen plugin the stage imports (plugin_deps)


def optimizer_keys(section: str) -> tuple[str, ...]:
    """``<section>.<field>`` for every optimiser field (``params.OptimizerParams``), in its order."""
    from rlhf_pipeline.params import OptimizerParams

    return tuple(f"{section}.{name}" for name in OptimizerParams.model_fields)


#: The sampling keys of generate that evaluation reads (all but num_responses: evaluate has its own).
SAMPLING = ("generate.backend", "generate.max_new_tokens", "generate.temperature", "generate.top_p",
            "generate.batch_size", "generate.dtype", "generate.tensor_parallel_size",
            "generate.gpu_memory_utilization")
#: The engine keys of generate (the benchmark sets its own token limit and samples greedily).
ENGINE = ("generate.backend", "generate.batch_size", "generate.dtype", "generate.tensor_parallel_size",
          "generate.gpu_memory_utilization")
LOGPROB_TEMPERATURE = ("generate.temperature", "the log-prob temperature when train.temperature is null")


def iteration_chain(*, names: dict[str, str], iteration: str, policy: str, data: str, metrics: str,
                    model_out: str, log: str, foreach: str = "", wdir: str = "", reward_model: str = "",
                    comment: str = "") -> list[Stage]:
    """generate → score → pairs → ref_logprobs → train: one iteration of REBEL's Algorithm 1 (Gao et al.
    2024) from ``policy`` (π_t, also the reference with ``train.reference: previous``) to ``model_out``
    (π_{t+1}), its data under ``data``/ and metrics under ``metrics``/; ``reward_model``: score with
    a learned reward model as well as the configured scorers. ``names`` maps each step to its stage name."""
    def step(key: str, module: str, cmd: tuple[Opt, ...], params: tuple[Param, ...], **kw) -> Stage:
        return Stage(names[key], module, cmd, params, foreach=foreach, wdir=wdir, **kw)

    prompts = "data/prompts/train.parquet"
    return [
        step("generate", "generate",
             (Arg("--iteration", iteration), In("--policy", policy), In("--prompts", prompts),
              Out("--out", f"{data}/generations.parquet"), Metrics("--metrics", f"{metrics}/generate.json")),
             ("seed", "data.prompts_per_iteration", "data.reuse_prompts", "generate"), comment=comment),
        step("score", "score",
             ((In("--reward-model", reward_model),) if reward_model else ())
             + (In("--generations", f"{data}/generations.parquet"), In("--prompts", prompts),
                Out("--out", f"{data}/scores.parquet"), Metrics("--metrics", f"{metrics}/score.json")),
             ("reward",)),
        step("pairs", "pairs",
             (In("--tokenizer", "models/base", "the tokenizer; training never changes it"), In("--prompts", prompts),
              In("--generations", f"{data}/generations.parquet"), In("--scores", f"{data}/scores.parquet"),
              Out("--out", f"{data}/pairs.parquet"), Metrics("--metrics", f"{metrics}/pairs.json")),
             ("pairs",)),
        step("ref_logprobs", "ref_logprobs",
             (In("--previous", policy), In("--base", "models/base"), In("--pairs", f"{data}/pairs.parquet"),
              Out("--out", f"{data}/ref_logprobs.parquet"), Metrics("--metrics", f"{metrics}/ref_logprobs.json")),
             ("train.reference", "train.temperature", LOGPROB_TEMPERATURE, "train.dtype", "train.logprob_batch_size"),
             inner_comment="train.reference picks which of the two policies is the reference (previous: π_t, REBEL)"),
        step("train", "train",
             (Arg("--iteration", iteration), In("--policy", policy), In("--pairs", f"{data}/pairs.parquet"),
              In("--ref-logprobs", f"{data}/ref_logprobs.parquet"), Out("--out", model_out),
              Metrics("--metrics", f"{metrics}/train.json"), Plot("--log", log, "rendered by the top-level plots below")),
             ("seed", "train.objective", "train.temperature", LOGPROB_TEMPERATURE, *optimizer_keys("train"), "plugins"),
             plugins=(OBJECTIVE,)),
    ]


def evaluate_stage(name: str, policy: str, out: str, metrics: str, *, wdir: str = "", foreach: str = "",
                   comment: str = "") -> Stage:
    """A policy against π0 on the validation prompts (paired, same seeds as π0's responses)."""
    return Stage(name, "evaluate",
                 (In("--policy", policy), In("--base", "models/base"), In("--base-responses", "data/eval/base.parquet"),
                  In("--prompts", "data/prompts/val.parquet"), Out("--out", out), Metrics("--metrics", metrics)),
                 ("seed", "evaluate", "reward.scorers", *SAMPLING), comment=comment, wdir=wdir, foreach=foreach)


def default_dag() -> list[Stage]:
    it = "${key}"
    return [
        Stage("prepare_model", "prepare_model",
              (Out("--out", "models/base"), Metrics("--metrics", "metrics/prepare_model.json")), ("policy",),
              extra_deps=(("data/sources", "a local policy.model folder must lie here, so DVC sees its edits"),)),
        Stage("prepare_prompts", "prepare_prompts",
              (In("--model", "models/base", "tokenizer and context: prompts too long for the model are dropped here"),
               Out("--train", "data/prompts/train.parquet"), Out("--val", "data/prompts/val.parquet"),
               Out("--test", "data/prompts/test.parquet"), Metrics("--metrics", "metrics/prepare_prompts.json")),
              ("seed", "data.source",
               ("data.constraints", "source ifeval_constraints: the base instructions and constraints drawn"),
               "data.path", "data.dataset", "data.config_name", "data.data_files", "data.split", "data.prompt_field",
               "data.num_prompts", "data.test_size", "data.val_size",
               ("data.prompts_per_iteration", "every iteration's chunk of train prompts must exist (checked here)"),
               "data.reuse_prompts", "iterations", "generate.max_new_tokens", "evaluate.max_new_tokens",
               "pairs.max_prompt_tokens",
               ("train.objective", "its keys are checked here (its plugin's Params), before minutes of sampling"),
               ("reward.scorers", "their keys too (each scorer's Params)"), "plugins"),
              extra_deps=(("data/sources", ""),), plugins=(OBJECTIVE, SCORER)),
        *iteration_chain(names={k: k for k in ("generate", "score", "pairs", "ref_logprobs", "train")},
                         iteration=it, policy="models/${item.prev}", data=f"data/{it}", metrics=f"metrics/{it}",
                         model_out=f"models/{it}", log=f"metrics/train_log/{it}.tsv", foreach="${iterations}"),
        Stage("evaluate_base", "evaluate_base",
              (In("--policy", "models/base"), In("--val", "data/prompts/val.parquet"),
               In("--test", "data/prompts/test.parquet"), Out("--out", "data/eval/base.parquet"),
               Metrics("--metrics", "metrics/eval/base.json")),
              ("seed", ("evaluate.num_responses", "the sampling keys only: the comparison's are read by evaluate"),
               "evaluate.max_new_tokens", "evaluate.temperature", "evaluate.top_p", "evaluate.batch_size",
               ("reward.scorers", "not missing_eos_penalty: that shapes the training reward only"),
               ("#", "evaluate samples as generate does, except for the number of responses"), *SAMPLING),
              comment="π0 on the validation and test prompts, once: experiments that change only training reuse it."),
        evaluate_stage("evaluate", "models/${key}", "data/eval/${key}.parquet", "metrics/eval/${key}.json",
                       foreach="${iterations}",
                       comment="Every iteration's policy against π0 on the validation prompts (paired, same seeds)."),
        Stage("evaluate_test", "evaluate_test",
              (In("--models", "models"), In("--base-responses", "data/eval/base.parquet"),
               In("--prompts", "data/prompts/test.parquet"), In("--val-metrics", "metrics/eval"),
               Out("--out", "data/eval/test.parquet"), Metrics("--metrics", "metrics/eval.json"),
               Plot("--plot", "metrics/eval_iterations.tsv", "rendered by the top-level plots below"),
               Plot("--histogram", "metrics/eval_reward_hist.tsv")),
              ("iterations", "seed", "evaluate", "reward.scorers", *SAMPLING),
              comment="The last iteration against π0 on the test prompts (once per pipeline execution), and the\n"
                      "per-iteration validation table: metrics/eval.json, the plots below."),
        Stage("benchmark_base", "benchmark_base",
              (In("--policy", "models/base"), Out("--out", "data/benchmark/base.parquet"),
               Metrics("--metrics", "metrics/benchmark/base.json")),
              ("seed", "benchmark.num_prompts", "benchmark.max_new_tokens", "benchmark.batch_size", *ENGINE),
              comment="The standard IFEval benchmark (all 541 prompts, greedy): π0 once, so every recipe reuses it."),
        Stage("benchmark", "benchmark",
              (In("--models", "models"), In("--base-responses", "data/benchmark/base.parquet"),
               Out("--out", "data/benchmark/final.parquet"), Metrics("--metrics", "metrics/benchmark/final.json")),
              ("iterations", "seed", "benchmark", *ENGINE),
              comment="The last iteration against π0 on the benchmark, once per pipeline execution: the headline "
                      "figures."),
        Stage("report", "report",
              (In("--metrics", "metrics"), In("--test-table", "data/eval/test.parquet"),
               In("--benchmark-table", "data/benchmark/final.parquet"), Arg("--lock", "dvc.lock")),
              (ALL_PARAMS,),
              comment="One MLflow run per completed pipeline execution. No DVC outputs: if the tracking server is\n"
                      "down, everything above is already written and cached, and the next `dvc repro` reruns only "
                      "this."),
    ]


def classic_dag() -> list[Stage]:
    wdir = ".."
    return [
        Stage("sft", "sft",
              (In("--policy", "models/base"), In("--sources", "data/sources", "sft.source file / local dataset must "
                                                                               "lie here"),
               In("--prompts", "data/prompts/train.parquet", "sft.source rejection_sampling: iteration 1's best "
                                                             "responses"),
               In("--generations", "data/iter_1/generations.parquet"), In("--scores", "data/iter_1/scores.parquet"),
               Out("--out", "classic/models/sft"), Metrics("--metrics", "classic/metrics/sft.json"),
               Plot("--log", "classic/metrics/train_log/sft.tsv")),
              ("seed", "sft"), wdir=wdir),
        Stage("reward_model", "reward_model",
              (In("--policy", "classic/models/sft"), In("--prompts", "data/prompts/train.parquet"),
               In("--generations", "data/iter_1/generations.parquet"), In("--scores", "data/iter_1/scores.parquet"),
               In("--sources", "data/sources"), Out("--out", "classic/models/reward"),
               Metrics("--metrics", "classic/metrics/reward_model.json"),
               Plot("--log", "classic/metrics/train_log/reward_model.tsv")),
              ("seed", "reward_model"), wdir=wdir,
              comment="Bradley-Terry reward model from the SFT policy, on every differently-rewarded pair of iteration\n"
                      "1's responses (reward_model.source: generations; a file or dataset instead reads --sources)."),
        evaluate_stage("evaluate_sft", "classic/models/sft", "classic/data/eval/sft.parquet",
                       "classic/metrics/eval/sft.json", wdir=wdir,
                       comment="The SFT policy against π0 on the validation prompts (paired, same seeds, IFEval reward): "
                               "the\ndefault pipeline's evaluate stage, on classic/models/sft."),
        *iteration_chain(names={k: f"rl_{k}" for k in ("generate", "score", "pairs", "ref_logprobs", "train")},
                         iteration="iter_2", policy="classic/models/sft", data="classic/data/rl",
                         metrics="classic/metrics/rl", model_out="classic/models/rl",
                         log="classic/metrics/train_log/rl.tsv", wdir=wdir, reward_model="classic/models/reward",
                         comment="RL against the learned reward (the classic variant's third step): one iteration of "
                                 "the\ndefault chain from the SFT policy, scored by classic/models/reward. It samples "
                                 "iteration 2's\nprompts and seeds (--iteration iter_2): train prompts the reward model "
                                 "never saw (it trained\non iteration 1's). The reward is the reward model's score "
                                 "alone; IFEval stays in the scores at\nweight 0 as the ground truth, and evaluate_rl "
                                 "judges the policy by IFEval only."),
        evaluate_stage("evaluate_rl", "classic/models/rl", "classic/data/eval/rl.parquet",
                       "classic/metrics/eval/rl.json", wdir=wdir,
                       comment="The RL policy against π0 on the validation prompts, judged by the configured scorers "
                               "(IFEval):\ndoes optimising the learned reward raise the true one? "
                               "(classic/metrics/eval/sft.json is the\nSFT policy's figure, metrics/eval/iter_1.json "
                               "the default DAG's on the IFEval reward itself.)"),
        Stage("overoptimization", "overoptimization",
              (In("--reward-model", "classic/models/reward"), In("--sft", "classic/data/eval/sft.parquet"),
               In("--rl", "classic/data/eval/rl.parquet"), In("--rebel", "data/eval/iter_1.parquet"),
               Metrics("--metrics", "classic/metrics/overoptimization.json")),
              ("seed", "evaluate.bootstrap_samples", "evaluate.confidence"), wdir=wdir,
              comment="Proxy against gold (Gao, Schulman & Hilton 2022): the learned reward's gain and IFEval's gain\n"
                      "over π0 on the same validation responses, with each policy's KL: the SFT policy, RL against\n"
                      "the learned reward, and the default DAG's iteration 1 against IFEval itself."),
    ]


def online_dag() -> list[Stage]:
    wdir, each = "..", "${online.algorithms}"
    shared = ("online.rollout_steps", "online.prompts_per_step", "online.num_responses", "online.num_ppo_epochs",
              "online.max_new_tokens", "online.temperature", "online.top_p", "online.generation_batch_size",
              "online.backend", "online.vllm_gpu_memory_utilization", "online.logprob_batch_size")
    return [
        Stage("online_train", "online_train",
              (Arg("--algorithm", "${key}"), In("--policy", "models/base"), In("--reference", "models/base"),
               In("--prompts", "data/prompts/train.parquet"), Out("--out", "online/models/${key}"),
               Out("--rollouts", "online/data/${key}/rollouts.parquet"),
               Metrics("--metrics", "online/metrics/${key}/train.json"),
               Plot("--log", "online/metrics/train_log/${key}.tsv")),
              ("seed", "reward", "online.algorithms.${key}", *shared, *optimizer_keys("online"), "plugins"),
              foreach=each, wdir=wdir, plugins=(ONLINE_ALGORITHM,)),
        Stage("online_evaluate", "online_evaluate",
              (In("--policy", "online/models/${key}"), In("--base", "models/base"),
               In("--base-responses", "data/eval/base.parquet"), In("--val", "data/prompts/val.parquet"),
               In("--test", "data/prompts/test.parquet"), Out("--out", "online/data/eval/${key}.parquet"),
               Metrics("--metrics", "online/metrics/eval/${key}.json")),
              ("seed", "evaluate", "reward.scorers", *SAMPLING), foreach=each, wdir=wdir,
              comment="Each online policy against π0 on the validation and the test prompts (paired, same seeds)."),
        Stage("online_report", "online_report",
              (In("--metrics", "online/metrics"), In("--offline", "metrics/eval.json"), Arg("--lock", "online/dvc.lock")),
              (ALL_PARAMS,), wdir=wdir,
              comment="One MLflow run: every algorithm's curves and evaluations, the default DAG's beside them."),
    ]


@dataclass(frozen=True)
class Pipeline:
    path: str
    header: str
    stages: list[Stage]
    plots: str = ""
    vars: tuple[str, ...] = ()


DEFAULT_HEADER = """\
The RLHF iteration of REBEL (Gao et al., arXiv 2404.16767, Algorithm 1) as DVC stages: iteration t
samples from π_t = models/<prev> and trains π_{t+1} = models/iter_<t> with train.objective (iterated
DPO by default). Each cmd shows its inputs and outputs; each stage lists exactly the code (its import
graph), files and params keys it reads. GENERATED by `python -m stages.dag` (make dvc-yaml) from
stages/dag.py: edit the declarations there, not this file. See docs/design.md."""

CLASSIC_HEADER = """\
The classic RLHF variant (Ouyang et al. 2022): supervised fine-tuning on demonstrations, a
Bradley-Terry reward model started from the SFT policy, then RL (the default DAG's iteration chain)
against it. Its own file so that `dvc repro` / `make repro` (./dvc.yaml only) keeps running the
default pipeline; run this one with
  dvc repro classic/dvc.yaml        (or: make repro-classic; experiments: dvc exp run classic/dvc.yaml -S sft.learning_rate=1e-5)
It reads the default pipeline's outputs (models/base, the prompts, the base policy's evaluation)
and writes only under classic/. Commands run from the repository root (wdir), as in ./dvc.yaml;
params are the root params.yaml's (vars: rl_train's code deps name train.objective's file).
GENERATED by `python -m stages.dag` from stages/dag.py."""

ONLINE_HEADER = """\
Online RL: PPO, RLOO, GRPO and online REBEL from the base policy, each sampling its own
rollouts, judged like the default pipeline's paired protocol, on validation and test. One
online_train / online_evaluate stage per key of online.algorithms (params.yaml); its own file, so
`dvc repro` / `make repro` keeps running the default pipeline only. Run it with
  dvc repro online/dvc.yaml      (or: make repro-online)
Experiments: dvc exp run online/dvc.yaml -S online.algorithms.ppo.kl_coef=0.1
             dvc exp run online/dvc.yaml -S '+online.algorithms.rloo={name: rloo}'
It reads the default pipeline's models/base, prompts, the base policy's evaluation and, for the
comparison in the report, its metrics/eval.json; it writes only under online/. Commands run from
the repository root (wdir); params are the root params.yaml's (vars: the foreach reads them).
GENERATED by `python -m stages.dag` from stages/dag.py."""

DEFAULT_PLOTS = """\
plots:
  - held-out reward vs iteration (validation, iteration 0 = base):
      x: iteration
      y:
        metrics/eval_iterations.tsv: [reward_diff, reward_diff_ci_low, reward_diff_ci_high]
  - win rate vs iteration (validation):
      x: iteration
      y:
        metrics/eval_iterations.tsv: win_rate_value
  - KL(π_t ‖ π0) vs iteration (validation, nats per response):
      x: iteration
      y:
        metrics/eval_iterations.tsv: kl_mean
  - metrics/train_log:   # training loss per update, one line per iteration
      x: update
      y: loss
  - test reward, base vs last iteration:
      template: bar_horizontal
      x: reward
      y:
        metrics/eval_reward_hist.tsv: [base, trained]
"""

ONLINE_PLOTS = """\
plots:
  - online/metrics/train_log:   # rollout reward per update, one line per algorithm
      x: update
      y: reward
"""


def pipelines() -> list[Pipeline]:
    return [Pipeline("dvc.yaml", DEFAULT_HEADER, default_dag(), DEFAULT_PLOTS),
            Pipeline("classic/dvc.yaml", CLASSIC_HEADER, classic_dag(), vars=("../params.yaml:train",)),
            Pipeline("online/dvc.yaml", ONLINE_HEADER, online_dag(), ONLINE_PLOTS, vars=("../params.yaml:online",))]


# ---- rendering ---------------------------------------------------------------------------------

def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.splitlines()]


def _with_note(item: str, note: str) -> str:
    return f"{item}   # {note}" if note else item


def _units(stage: Stage) -> list[str]:
    """The command line in unbreakable pieces: the program, then each option with its value."""
    return [f"python -m stages.{stage.module}", *(f"{o.option} {o.value}" for o in stage.cmd)]


def _folded(units: list[str], indent: str) -> list[str]:
    """``units`` as the lines of a YAML folded block (``>-``), each at most :data:`WIDTH` wide."""
    lines = [units[0]]
    for unit in units[1:]:
        if len(indent) + len(lines[-1]) + 1 + len(unit) > WIDTH:
            lines.append(unit)
        else:
            lines[-1] += f" {unit}"
    return [f"{indent}{line}" for line in lines]


def render_stage(stage: Stage, root: Path = ROOT) -> list[str]:
    """The stage's dvc.yaml lines (two-space indentation under ``stages:``)."""
    out = _comment(stage.comment, "  ") if stage.comment else []
    out.append(f"  {stage.name}:")
    body = "    "
    if stage.foreach:
        out += [f"    foreach: {stage.foreach}", "    do:"]
        body = "      "
    if stage.inner_comment:
        out += _comment(stage.inner_comment, body)
    if stage.wdir:
        out.append(f"{body}wdir: {stage.wdir}")
    command = " ".join(_units(stage))
    if len(body) + len("cmd: ") + len(command) <= WIDTH:
        out.append(f"{body}cmd: {command}")
    else:
        out.append(f"{body}cmd: >-")
        out += _folded(_units(stage), body + "  ")
    item = body + "  - "
    out.append(f"{body}deps:")
    out += [f"{item}{path}" for path in stage_code_deps(stage, root)]
    inputs = [(path, note) for path, note in stage.extra_deps]
    inputs += [(o.value, o.note) for o in stage.cmd if o.role == "in"]
    seen = set()
    for path, note in inputs:
        if path not in seen:
            seen.add(path)
            out.append(_with_note(f"{item}{path}", note))
    out.append(f"{body}params:")
    for param in stage.params:
        key, note = (param, "") if isinstance(param, str) else param
        if key == "#":
            out += _comment(note, body + "  ")
        else:
            out.append(_with_note(f"{item}{key}", note))
    outs = [o for o in stage.cmd if o.role in ("out", "plot")]
    if outs:
        out.append(f"{body}outs:")
        for o in outs:
            if o.role == "out":
                out.append(_with_note(f"{item}{o.value}", o.note))
            else:
                out += [_with_note(f"{item}{o.value}:", o.note), f"{body}      cache: false"]
    metrics = [o for o in stage.cmd if o.role == "metrics"]
    if metrics:
        out.append(f"{body}metrics:")
        for o in metrics:
            out += [f"{item}{o.value}:", f"{body}      cache: false"]
    return out


def render(pipeline: Pipeline, root: Path = ROOT) -> str:
    """The whole dvc.yaml text of ``pipeline``."""
    lines = _comment(pipeline.header, "")
    if pipeline.vars:
        lines += ["vars:", *(f"  - {v}" for v in pipeline.vars), ""]
    lines.append("stages:")
    for i, stage in enumerate(pipeline.stages):
        if i:
            lines.append("")
        lines += render_stage(stage, root)
    text = "\n".join(lines) + "\n"
    if pipeline.plots:
        text += "\n" + pipeline.plots
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed dvc.yaml differs; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for pipeline in pipelines():
        path = ROOT / pipeline.path
        text = render(pipeline)
        if path.read_text(encoding="utf-8") != text:
            stale.append(pipeline.path)
            if not args.check:
                path.write_text(text, encoding="utf-8")
    if args.check and stale:
        print(f"error: {', '.join(stale)} differ from stages/dag.py's declarations: run `make dvc-yaml`",
              file=sys.stderr)
        return 1
    print(f"{'stale' if args.check else 'written'}: {', '.join(stale) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
