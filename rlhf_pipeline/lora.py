"""LoRA and QLoRA for the one training loop (``training.train_policy``), through peft.

LoRA (Hu et al. 2022, arXiv 2106.09685, Eq. 3): each target linear layer computes
``h = W x + (alpha / r) · B A dropout(x)`` with ``W`` frozen, ``A`` (r × d_in, Kaiming-uniform) and
``B`` (d_out × r, zeros) trained, so training starts from the policy itself. QLoRA (Dettmers et al.
2023, arXiv 2305.14314): ``W`` is stored in 4-bit NormalFloat (bitsandbytes, CUDA only), the LoRA
factors and the computation in bf16.

A stage trained with LoRA writes the merged weights (``W + (alpha/r)·B A``) as its model folder, so
generation, vLLM, scoring and the next iteration load it as any other policy, and the adapter alone
under ``adapter/`` in that folder (peft's ``adapter_config.json`` + ``adapter_model.safetensors``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.params import LoraParams

#: subfolder of a stage's model folder that holds the LoRA adapter alone
ADAPTER_DIR = "adapter"


def check_quantization(cfg: LoraParams | None, key: str) -> None:
    """Fail before any model is loaded when QLoRA is asked for where it cannot run.

    Raises:
        PipelineError: ``<key>.lora.load_in_4bit`` without a CUDA device or without bitsandbytes.
    """
    if cfg is None or not cfg.load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise PipelineError(f"{key}.lora.load_in_4bit: QLoRA stores the base weights in 4-bit with bitsandbytes, "
                            "which needs a CUDA device; this machine has none (use LoRA: load_in_4bit: false)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PipelineError(f"{key}.lora.load_in_4bit: QLoRA needs bitsandbytes (pip install bitsandbytes), "
                            "which is not installed") from None


def quantization_config(cfg: LoraParams | None):
    """transformers' ``BitsAndBytesConfig`` for QLoRA's base weights (4-bit NF4, double quantization,
    bf16 compute: Dettmers et al. 2023, Sec. 3), or None for plain LoRA / full fine-tuning."""
    if cfg is None or not cfg.load_in_4bit:
        return None
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def apply_lora(model, cfg: LoraParams, task_type: str, gradient_checkpointing: bool = False,
               section: str = "train"):
    """Wrap ``model`` with fresh LoRA factors on ``cfg.target_modules``; only they (and, for a
    reward model, its new score head) train.

    Call after the model's own dropout is turned off: the LoRA branch's dropout (``cfg.dropout``) is
    created here and stays as asked. ``task_type``: peft's ``CAUSAL_LM`` (policies) or ``SEQ_CLS``
    (reward models: the head, new and untrained, is saved and trained in full).
    The factors are drawn from torch's global RNG: seed it first.

    ``section``: the params section of ``cfg`` (``train``, ``sft``, ``reward_model``), for errors.

    Raises:
        PipelineError: a target module name that matches no layer of the model, or the output head
            when its weight is tied to the input embeddings (merging its factors would change the
            embeddings too, so the saved model would not be the trained one).
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    key = f"{section}.lora.target_modules"
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    tied = inputs is not None and outputs is not None and outputs.weight is inputs.weight
    if cfg.load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                        bias="none", task_type=task_type)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        raise PipelineError(f"{key} {cfg.target_modules!r}: {' '.join(str(exc).split())[:300]}") from None
    if tied and hasattr(wrapped.get_base_model().get_output_embeddings(), "lora_A"):
        raise PipelineError(f"{key} {cfg.target_modules!r}: the output head shares its weight with the input "
                            "embeddings (tie_word_embeddings), so merging its LoRA factors would change the "
                            "embeddings too and the saved model would differ from the trained one; leave the "
                            "head out of target_modules ('all-linear' already does)")
    return wrapped


def save_lora(model, out_dir: str | os.PathLike, load_base=None) -> None:
    """Write ``model`` (a peft model) to ``out_dir``: the merged weights as a plain transformers
    model folder and the adapter under ``out_dir/adapter``. The tokenizer is the caller's.

    ``load_base``: QLoRA only, a callable returning the base model in full precision; the adapter is
    merged into it (merging into 4-bit weights would round them again). Plain LoRA merges in place:
    ``model`` is not usable afterwards.
    """
    from peft import PeftModel

    out = Path(out_dir)
    model.save_pretrained(out / ADAPTER_DIR, safe_serialization=True)
    if load_base is not None:
        model = PeftModel.from_pretrained(load_base(), out / ADAPTER_DIR)
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
