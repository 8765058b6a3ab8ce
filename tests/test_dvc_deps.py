"""`dvc.yaml` lists exactly what each stage reads: its code (every project module it can import,
lazily imported ones included), its input files, and the params keys it reads.

Checked on DVC's own resolved pipeline (``Repo.index.stages``: every ``foreach`` item expanded
with the committed params.yaml), so templated stages are checked as DVC runs them. Code: derived
statically from the stage module's imports (anywhere in a module, so an import inside a function
counts), followed transitively through ``rlhf_pipeline`` and ``stages``, package ``__init__``
files included. Files: the paths on the stage's command line. Params: recorded at run time by
running each stage's own ``main`` on the tiny pipeline with a params object that logs every field
read (see ``test_params_read_match_dvc_yaml`` in tests/test_pipeline_dvc.py).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import REPO

from stages.dag import pipelines, render, stage_code_deps
#: Where a stage's command line names project data (``dvc.lock`` is DVC's own file, not a dep); the
#: classic variant (classic/dvc.yaml) writes under classic/, the online one (online/dvc.yaml) under online/.
DATA = ("data/", "models", "metrics", "classic/", "online/")


def resolved_stages(project: Path = REPO) -> dict[str, dict]:
    """``{stage name: {cmd, deps, outs, params, file}}`` of DVC's resolved pipelines
    (``generate@iter_1`` …): ./dvc.yaml's and classic/dvc.yaml's.

    ``deps`` and ``outs`` are sets of paths relative to the repository (every stage runs there);
    ``params`` is the list of params.yaml keys (a key of ``None`` means the whole file); ``file`` is
    the stage's dvc.yaml.
    """
    from dvc.repo import Repo

    out = {}
    with Repo(str(project)) as repo:
        for stage in repo.index.stages:
            deps, params = set(), []
            for dep in stage.deps:
                if type(dep).__name__ == "ParamsDependency":
                    params.extend(dep.params or [None])
                else:
                    deps.add(dep.def_path)
            assert stage.name not in out, f"two stages named {stage.name}"
            out[stage.name] = {"cmd": stage.cmd, "deps": deps, "outs": {o.def_path for o in stage.outs},
                               "params": params, "file": os.path.relpath(stage.path, project)}
    return out


STAGES = resolved_stages()


@pytest.mark.parametrize("pipeline", pipelines(), ids=lambda p: p.path)
def test_the_committed_dvc_yaml_is_the_generated_one(pipeline):
    """dvc.yaml, classic/dvc.yaml and online/dvc.yaml are written by `python -m stages.dag` (make
    dvc-yaml) from stages/dag.py; an edit by hand, or a new import that changes a stage's code deps,
    fails here until they are regenerated."""
    committed = (REPO / pipeline.path).read_text(encoding="utf-8")
    assert committed == render(pipeline), f"{pipeline.path} is not the generated file: run `make dvc-yaml`"


def stage_module(stage: str) -> str:
    cmd = STAGES[stage]["cmd"]
    match = re.match(r"python -m (stages\.\w+)( --[\w-]+ \S+)*$", cmd)
    assert match, f"{stage}: the command should be `python -m stages.<stage> --option value ...`, got {cmd!r}"
    return match.group(1)


def stage_argv(stage: str) -> list[str]:
    """The arguments after ``python -m stages.<stage>`` in the resolved command."""
    return STAGES[stage]["cmd"].split()[3:]


def command_paths(stage: str) -> set[str]:
    """Values of the stage's command-line options that name project data."""
    argv = stage_argv(stage)
    return {v for v in argv[1::2] if v.startswith(DATA) and not v.endswith("dvc.lock")}


DECLARED = {(p.path, s.name): s for p in pipelines() for s in p.stages}


def needed_code(stage: str) -> set[str]:
    """The stage's import closure and its chosen plugins' files (``stages.dag.stage_code_deps``),
    templates resolved with the committed params.yaml as DVC resolves them."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    name, _, key = stage.partition("@")
    decl = DECLARED[(STAGES[stage]["file"], name)]
    assert decl.module == stage_module(stage).removeprefix("stages.")
    chosen = {"${train.objective.name}": params["train"]["objective"]["name"]}
    if key in params["online"]["algorithms"]:
        chosen["${item.name}"] = params["online"]["algorithms"][key]["name"]
    out = set()
    for path in stage_code_deps(decl):
        for template, value in chosen.items():
            path = path.replace(template, value)
        out.add(path)
    return out


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_code_deps_are_exactly_the_modules_the_stage_imports(stage):
    listed = {d for d in STAGES[stage]["deps"] if d.endswith(".py")}
    needed = needed_code(stage)
    assert listed == needed, f"{stage}: missing {sorted(needed - listed)}, extra {sorted(listed - needed)}"


def test_a_plugin_stage_depends_on_the_chosen_plugin_file_only():
    # editing DPO must not make a REBEL run stale: the templated dep names one objective's file
    for stage in ("train@iter_1", "prepare_prompts", "rl_train"):
        files = {d for d in STAGES[stage]["deps"] if d.startswith("rlhf_pipeline/objectives/")}
        assert files == {"rlhf_pipeline/objectives/__init__.py", "rlhf_pipeline/objectives/dpo.py"}, stage
    for key in ("ppo", "grpo"):
        files = {d for d in STAGES[f"online_train@{key}"]["deps"] if d.startswith("rlhf_pipeline/online/")}
        assert files == {"rlhf_pipeline/online/__init__.py", f"rlhf_pipeline/online/{key}.py"}, key
    assert not any(d.startswith("rlhf_pipeline/objectives/") for d in STAGES["generate@iter_1"]["deps"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_file_deps_and_outputs_are_the_paths_on_the_command_line(stage):
    deps = {d for d in STAGES[stage]["deps"] if not d.endswith(".py")}
    outs = STAGES[stage]["outs"]
    paths = command_paths(stage)
    if stage in ("prepare_prompts", "prepare_model"):
        from rlhf_pipeline.params import PROMPT_SOURCES_DIR

        paths.add(PROMPT_SOURCES_DIR)  # a file source or local model must live there (checked by the params schema)
    assert deps | outs == paths, (f"{stage}: declared but not on the command line: {sorted((deps | outs) - paths)}; "
                                  f"on the command line but not declared: {sorted(paths - (deps | outs))}")
    # What a stage writes is no input of its own.
    assert not deps & outs


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def test_every_dep_that_another_stage_writes_is_a_declared_output():
    outputs = set().union(*(s["outs"] for s in STAGES.values()))
    for stage, spec in STAGES.items():
        for dep in spec["deps"]:
            if dep.startswith(DATA) and dep != "data/sources":
                # a file another stage writes, or a folder holding such outputs (report reads metrics/)
                assert any(_overlaps(dep, o) for o in outputs), f"{stage} reads {dep}, which no stage writes"


def test_iterations_chain_policies_and_keep_their_files_apart(tmp_path):
    """Iteration t samples from and starts from models/<prev>, writes models/iter_t, and no two
    stages write the same path: on the committed pipeline with three iterations (the default runs one)."""
    import yaml
    from conftest import make_project_clone

    project = make_project_clone(tmp_path / "proj")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["iterations"] = {"iter_1": {"prev": "base"}, "iter_2": {"prev": "iter_1"}, "iter_3": {"prev": "iter_2"}}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    stages = resolved_stages(project)
    for t, name in enumerate(params["iterations"], start=1):
        prev = "models/base" if t == 1 else f"models/iter_{t - 1}"
        assert prev in stages[f"generate@{name}"]["deps"] and prev in stages[f"train@{name}"]["deps"]
        assert f"models/{name}" in stages[f"train@{name}"]["outs"]
        assert {prev, "models/base"} <= stages[f"ref_logprobs@{name}"]["deps"]
    for pipeline in (stages, STAGES):
        outs = [o for s in pipeline.values() for o in s["outs"]]
        assert len(outs) == len(set(outs))


# ---- params: recorded at run time -------------------------------------------------------------

#: Keys a stage module reads only on a path the tiny CPU pipeline does not take (another data
#: source, the vLLM backend), by module (stages.generate serves generate@iter_t and rl_generate);
#: listed here so that declaring the whole section is not reported as "more".
OTHER_PATHS = {
    "prepare_prompts": {"data.path", "data.dataset", "data.config_name", "data.data_files", "data.split",
                        "data.prompt_field", "data.constraints.base_instructions", "data.constraints.min_constraints",
                        "data.constraints.max_constraints", "data.constraints.instructions"},
    "generate": {"generate.tensor_parallel_size", "generate.gpu_memory_utilization"},
    "sft": {"sft.path", "sft.dataset", "sft.config_name", "sft.data_files", "sft.split"},
    "reward_model": {"reward_model.path", "reward_model.dataset", "reward_model.config_name",
                     "reward_model.data_files", "reward_model.split"},
}


class ParamsRecorder:
    """Wraps a validated params model and records the dotted path of every field read through it.

    Sections come back wrapped too; methods run with the wrapper as ``self``, so the fields they
    read are recorded; ``model_dump`` records every field it dumps.
    """

    def __init__(self, model, path: str = "", log: set[str] | None = None):
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_log", set() if log is None else log)

    def _key(self, name: str) -> str:
        return f"{self._path}.{name}" if self._path else name

    def __getattr__(self, name: str):
        from pydantic import BaseModel

        model = self._model
        if name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                return ParamsRecorder(value, self._key(name), self._log)
            if isinstance(value, dict) and value and all(isinstance(v, BaseModel) for v in value.values()):
                return RecordedMapping(value, self._key(name), self._log)
            self._log.add(self._key(name))
            return value
        if name == "model_dump":
            def dump(**kwargs):
                exclude = set(kwargs.get("exclude") or ())

                def record(m, path):  # every leaf under a dumped field, nested models included
                    for field in type(m).model_fields:
                        value = getattr(m, field)
                        if isinstance(value, BaseModel):
                            record(value, f"{path}.{field}")
                        else:
                            self._log.add(f"{path}.{field}")

                for field in type(model).model_fields:
                    if field not in exclude:
                        value = getattr(model, field)
                        if isinstance(value, BaseModel):
                            record(value, self._key(field))
                        else:
                            self._log.add(self._key(field))
                return model.model_dump(**kwargs)
            return dump
        attr = getattr(type(model), name, None)
        if callable(attr):
            return attr.__get__(self)
        return getattr(model, name)

    def leaves(self) -> set[str]:
        return set(self._log)


class RecordedMapping(dict):
    """A params mapping of models (``iterations``, ``online.algorithms``): looking one item up
    records only what is read of it (``online.algorithms.ppo.clip``); listing the keys reads the
    whole mapping (a stage that iterates over it depends on every item)."""

    def __init__(self, value: dict, path: str, log: set[str]):
        super().__init__(value)
        self._path, self._log = path, log

    def __getitem__(self, key):
        return ParamsRecorder(super().__getitem__(key), f"{self._path}.{key}", self._log)

    def __iter__(self):
        self._log.add(self._path)
        return super().__iter__()

    def __len__(self):
        self._log.add(self._path)
        return super().__len__()

    def items(self):
        self._log.add(self._path)
        return super().items()

    def values(self):
        self._log.add(self._path)
        return super().values()

    def keys(self):
        self._log.add(self._path)
        return super().keys()


def declared_params(stage: str) -> list[str]:
    return list(STAGES[stage]["params"])


def all_leaf_keys(section_path: str, params=None) -> set[str]:
    """Every leaf key under a section of ``params`` (default: the committed params.yaml's), e.g.
    ``generate`` -> ``generate.top_p`` ...; ``train.objective`` has the keys of the objective chosen."""
    from rlhf_pipeline.params import load_params

    model = params if params is not None else load_params(REPO / "params.yaml")
    for part in section_path.split("."):
        model = model[part] if isinstance(model, dict) else getattr(model, part)
    if not hasattr(type(model), "model_fields"):
        return {section_path}
    return {f"{section_path}.{f}" for f in type(model).model_fields}


def check_params_read(stage: str, read: set[str], params=None) -> None:
    """The keys ``read`` (at run time, with ``params``) against the stage's ``params:`` in dvc.yaml:
    every key read is declared, and every declared key is read (or read on a path listed in
    :data:`OTHER_PATHS`).

    Raises:
        AssertionError: naming the undeclared and the unread keys.
    """
    declared_keys = set()
    for entry in declared_params(stage):
        declared_keys |= all_leaf_keys(entry, params)
    read_or_other = read | OTHER_PATHS.get(stage_module(stage).removeprefix("stages."), set())
    undeclared = sorted(k for k in read if k not in declared_keys)
    unread = sorted(declared_keys - read_or_other)
    assert not undeclared and not unread, f"{stage}: reads undeclared {undeclared}; declares unread {unread}"


@pytest.mark.parametrize("lock", ["dvc.lock", "classic/dvc.lock", "online/dvc.lock"])
def test_every_lock_entry_is_a_stage_of_its_pipeline(lock):
    # dvc.lock kept about 500 lines of six stages that no longer existed (generate, score, ...)
    import yaml

    path = REPO / lock
    if not path.is_file():
        pytest.skip(f"{lock} not committed")
    dvcfile = str(Path(lock).with_name("dvc.yaml"))
    names = {name for name, stage in STAGES.items() if stage["file"] == dvcfile}
    entries = set((yaml.safe_load(path.read_text()) or {}).get("stages") or {})
    assert names and entries <= names, f"{lock}: entries of no stage: {sorted(entries - names)}"
