"""Plugins by name: the objectives of ``train.objective``, the online algorithms of
``online.algorithms`` and the scorers of ``reward.scorers`` (in the manner of verl's
``@register_policy_loss``).

A plugin is one file: a class that carries its params model as ``Params`` (a pydantic model whose
``name`` is a ``Literal`` of the plugin's name), decorated with the registry's ``register``. The
built-in ones live one per module in the registry's package, the file named as the plugin
(``rlhf_pipeline/objectives/dpo.py`` for ``name: dpo``; a scorer's ``-`` is a ``_`` in its file
name: ``rewards/sequence_classification.py``), and are imported only when chosen, so
that a stage's code deps name the chosen plugin's file alone (``stages/dag.py`` writes it as
``rlhf_pipeline/objectives/${train.objective.name}.py``): editing DPO does not make a REBEL run
stale. A plugin outside the package is a file listed in ``params.yaml``'s ``plugins`` (imported by
:func:`rlhf_pipeline.params.load_params` before the params are checked); docs/extending.md.

Two levels of checking, so that reading the params does not import every plugin:
``params.parse_params`` checks that a chosen name exists (:meth:`Registry.names`: the package's
module files and what is registered); :meth:`Registry.parse` validates the chosen plugin's keys
against its ``Params``, in the stages that run it and in ``prepare_prompts`` (the first stage,
so a bad key fails before minutes of sampling).
"""

from __future__ import annotations

import importlib
import importlib.util
import typing
from pathlib import Path

from pydantic import BaseModel, ValidationError

from rlhf_pipeline.errors import PipelineError


def plugin_name(params_model: type[BaseModel]) -> str:
    """The name a ``Params`` model declares: the one value of its ``name: Literal[...]`` field.

    Raises:
        TypeError: no ``name`` field, or not a one-value ``Literal``.
    """
    field = params_model.model_fields.get("name")
    values = typing.get_args(field.annotation) if field is not None else ()
    if field is None or typing.get_origin(field.annotation) is not typing.Literal or len(values) != 1:
        raise TypeError(f"{params_model.__qualname__}: a plugin's Params needs `name: Literal['<its name>']`")
    return values[0]


class Registry:
    """Plugins of one kind (``kind``, for messages), built-in ones in ``package``, by name.
    ``dashes``: the names write ``-`` where the files (Python modules) have ``_``."""

    def __init__(self, kind: str, package: str, dashes: bool = False):
        self.kind, self.package, self.dashes = kind, package, dashes
        self._plugins: dict[str, type] = {}

    def register(self, cls: type) -> type:
        """Class decorator: register ``cls`` under its ``cls.Params`` name.

        Raises:
            TypeError: ``cls`` has no valid ``Params`` (:func:`plugin_name`).
            ValueError: another class is registered under that name.
        """
        name = plugin_name(cls.Params)
        old = self._plugins.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"{self.kind} {name!r}: already registered by {old.__module__}.{old.__qualname__}")
        self._plugins[name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget an external plugin (tests); a built-in one comes back on the next :meth:`get`."""
        self._plugins.pop(name, None)

    def package_dir(self) -> Path:
        """The folder of the built-in plugins (the package is not imported)."""
        spec = importlib.util.find_spec(self.package)
        return Path(next(iter(spec.submodule_search_locations)))

    def module_stem(self, name: str) -> str:
        """The module (file stem) of built-in plugin ``name``."""
        return name.replace("-", "_") if self.dashes else name

    def builtin_names(self) -> list[str]:
        """Names of the built-in plugins: the package's module files not starting with ``_`` (a
        built-in plugin's name is its file's name, ``_`` written ``-`` where ``dashes``)."""
        stems = (p.stem for p in self.package_dir().glob("*.py") if not p.name.startswith("_"))
        return sorted(s.replace("_", "-") if self.dashes else s for s in stems)

    def names(self) -> list[str]:
        """Every name a params file may choose: built-in and registered."""
        return sorted(set(self.builtin_names()) | set(self._plugins))

    def module_file(self, name: str) -> Path:
        """The file a plugin is defined in (built-in: without importing it)."""
        if name in self._plugins:
            return Path(importlib.import_module(self._plugins[name].__module__).__file__)
        return self.package_dir() / f"{self.module_stem(name)}.py"

    def get(self, name: str, where: str) -> type:
        """The plugin class registered as ``name``, importing its built-in module on first use.

        Raises:
            PipelineError: no such plugin (``where``: the params key, for the message).
        """
        if name not in self._plugins and name in self.builtin_names():
            importlib.import_module(f"{self.package}.{self.module_stem(name)}")
        if name not in self._plugins:
            raise PipelineError(f"{where}: no {self.kind} named {name!r} (there are {', '.join(self.names())}; "
                                "an outside plugin is a file listed in params.yaml's plugins)")
        return self._plugins[name]

    def parse(self, choice: BaseModel | dict, where: str, source: str = "params.yaml") -> BaseModel:
        """``choice`` (a ``params.PluginChoice``, anything with its ``model_dump``, or a mapping)
        validated by its plugin's ``Params``.

        Raises:
            PipelineError: an unknown name, or one line per bad key (``source: where.key: reason``).
        """
        from rlhf_pipeline.params import format_errors

        raw = choice.model_dump() if hasattr(choice, "model_dump") else dict(choice)  # a model, or a view of one
        cls = self.get(raw.get("name"), f"{source}: {where}.name")
        try:
            return cls.Params.model_validate(raw)
        except ValidationError as exc:
            raise PipelineError(format_errors(source, exc, prefix=where.split("."))) from None

    def build(self, choice: BaseModel | dict, where: str, source: str = "params.yaml"):
        """An instance of the chosen plugin on its validated params (:meth:`parse`)."""
        cfg = self.parse(choice, where, source)
        return self.get(cfg.name, where)(cfg)


#: ``train.objective``: pairwise objectives (``rlhf_pipeline.objectives.PairObjective``).
OBJECTIVES = Registry("objective", "rlhf_pipeline.objectives")
#: ``online.algorithms.<key>``: online RL algorithms (``rlhf_pipeline.online.OnlineObjective``).
ONLINE_ALGORITHMS = Registry("online algorithm", "rlhf_pipeline.online")
#: ``reward.scorers[i]``: what a response's reward is made of (``rlhf_pipeline.rewards.Scorer``).
SCORERS = Registry("scorer", "rlhf_pipeline.rewards", dashes=True)
