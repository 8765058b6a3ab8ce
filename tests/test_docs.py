"""The pages a newcomer reads name only what exists: every module, file, `module.attribute` and
stage that README.md and docs/design.md name is checked against the code and the dvc.yaml files
(docs/design.md had drifted to `trainer.py` and `objectives/`, which never existed)."""
from __future__ import annotations

import importlib
import re

import pytest
import yaml
from conftest import REPO

PAGES = ["README.md", "docs/design.md"]
PIPELINES = ["dvc.yaml", "classic/dvc.yaml", "online/dvc.yaml"]


def spans(page: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", (REPO / page).read_text(encoding="utf-8"))


def stage_names() -> set[str]:
    return {name for p in PIPELINES for name in yaml.safe_load((REPO / p).read_text())["stages"]}


@pytest.mark.parametrize("page", PAGES)
def test_every_file_and_module_a_page_names_exists(page):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    checked = 0
    for span in spans(page):
        for path in re.findall(r"(?:^|\s)((?:[\w.-]+/)*[\w-]+\.(?:py|md|yaml|txt))\b", span):
            if "<" in path or path.startswith("."):
                continue
            where = [REPO / d / path for d in ("", "rlhf_pipeline", "stages")] if not path.startswith(
                ("rlhf_pipeline/", "stages/", "tests/", "docs/")) else [REPO / path]
            assert any(p.exists() for p in where), f"{page} names `{span}`: no {path}"
            checked += 1
        match = re.fullmatch(r"(?:rlhf_pipeline\.)?([a-z_]+)\.([A-Za-z_]+)(?:\(.*\))?", span)
        if match and match[2] in (params.get(match[1]) or {}):
            continue  # a params key (`online.algorithms`), not a module's attribute
        module_file = match and REPO / "rlhf_pipeline" / f"{match[1]}.py"
        if match and match[2] not in ("py", "md", "yaml", "txt", "json") and (
                module_file.exists() or (REPO / "rlhf_pipeline" / match[1] / "__init__.py").exists()):
            module = importlib.import_module(f"rlhf_pipeline.{match[1]}")
            assert hasattr(module, match[2]), f"{page} names `{span}`: rlhf_pipeline.{match[1]} has no {match[2]}"
            checked += 1
    assert checked >= 5


@pytest.mark.parametrize("page", PAGES)
def test_every_stage_a_pipeline_picture_names_exists(page):
    """The stage names in a page's pictures (the first code block with `─►`) and in backticks."""
    text = (REPO / page).read_text(encoding="utf-8")
    picture = next(block for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S) if "─►" in block)
    named = set(re.findall(r"\b([a-z][a-z_]+)(?:@|\(| ─►)", picture))
    named |= {s.split("@")[0] for s in spans(page) if re.fullmatch(r"[a-z_]+@[<\w>]+", s)}
    known = stage_names()
    missing = {n for n in named if n not in known and n not in {"for", "base", "iter_t"}}  # words of the picture
    assert not missing, f"{page} names stages that no dvc.yaml has: {sorted(missing)}"
    assert len(named & known) >= 8
