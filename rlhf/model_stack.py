"""The ModelStack: one base model with a named LoRA adapter per RLHF role, and two heads.

The policy, its reference, the reward model and the value head share one base
model (peft named adapters). Four separate models is what makes other RLHF code
run out of memory (DESIGN.md); here the extra cost of each role is a LoRA adapter
and, for the reward and value, a single linear head.

- ``policy``: the adapter PPO trains. Its value head rides on the same trunk.
- reference: the base with adapters disabled while the policy adapter is fresh;
  a frozen copy (adapter ``reference``) once a trained policy was loaded, since
  disabling a trained adapter gives the wrong reference (TRL learned this late).
- ``reward``: its own adapter plus a scalar head on the base's hidden states.
- ``base``: the bare base, policy version 0, whatever the reference is.

Adapters are saved as a folder each (LoRA weights, config with meta, the heads
of their role). Where the base comes from and how it is loaded is ``rlhf.models``.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlhf.errors import UserError
from rlhf.inference_copy import InferenceCopy, wanted

if TYPE_CHECKING:
    from rlhf.model_options import LoraSettings

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"   # peft's own, as LoraConfig.save_pretrained writes it
HEADS_FILE = "heads.safetensors"
# The workbench's record of a saved adapter, beside peft's files: its role, LoRA
# shape, the base it was trained on here, and the meta of its version (session
# settings, reward, iteration). Versions saved before it kept this record in
# adapter_config.json, which peft then refused ("missing required keys: peft_type").
RECORD_FILE = "workbench.json"


def compute_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """The precision the base computes in: ``requested`` (a ModelOptions.dtype)
    when given; else bf16 where the GPU has it, fp16 on older GPUs; on a CPU, bf16
    where it multiplies bf16 natively (``cpu_has_bf16``), else fp32, as bf16
    matmuls are emulated and slow on most other processors."""
    if requested is not None:
        return getattr(torch, requested)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bf16 matrix instructions: AVX512-BF16 or AMX on x86,
    BF16 on Arm (Linux reports them in /proc/cpuinfo; elsewhere: no). Measured on
    an EPYC with avx512_bf16, two threads: a 2048x2048 matmul 5x faster than fp32,
    a PPO iteration of the embedded model 1.4x with full weights (45 s against 63 s)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.lower().startswith(("flags", "features"))
             for flag in line.split(":", 1)[-1].split()}
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


class ModelStack:
    """One base model with the named adapters of every RLHF role."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, device: torch.device, quantized: bool,
                 lora: LoraSettings, model_dir: str, base_name: str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        """``model_dir``: where this base was loaded from; ``base_name``: how a saved
        adapter names its base for other tools (a hub id where there is one),
        ``model_dir`` when None; ``dtype``: the precision the base computes in
        (``compute_dtype`` when None)."""
        from peft import LoraConfig, get_peft_model

        self.tokenizer = tokenizer
        self.device = device
        self.quantized = quantized
        self.model_dir = model_dir
        self.base_name = base_name or model_dir
        self.lora = lora
        self.lora_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                      target_modules=lora.target_modules, task_type="CAUSAL_LM")
        for p in model.parameters():
            p.requires_grad_(False)
        if quantized:
            _keep_4bit_differentiable(model)
        self.dtype = dtype or compute_dtype(device)
        self.peft = get_peft_model(model, self.lora_config, adapter_name="policy")
        # Sample from a merged copy of a small base (rlhf.inference_copy); built at first use.
        self.fast_sampling = wanted(self)
        self._inference_copy: InferenceCopy | None = None
        self.peft.eval()  # dropout off everywhere; we never call train()
        for p in self.peft.parameters():  # trainers switch on what they train
            p.requires_grad_(False)
        hidden = model.config.hidden_size
        # Scalar heads on the last hidden state. The value head starts at zero
        # (DESIGN.md / lm-human-preferences), so the first advantages are the returns.
        self.value_head = nn.Linear(hidden, 1).to(device=device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.set_reward_heads(1)
        self.has_reward = False
        self.reference_is_copy = False
        self.policy_version = 0

    # -- structure

    def set_reward_heads(self, n: int) -> None:
        """A fresh reward head of ``n`` outputs: an ensemble whose mean is the reward
        (rlhf.reward_ensemble); 1 for a single head."""
        hidden = self.peft.get_base_model().config.hidden_size
        self.reward_head = nn.Linear(hidden, n).to(device=self.device, dtype=torch.float32)
        nn.init.normal_(self.reward_head.weight, std=1 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.reward_head.bias)

    @property
    def precision(self) -> str:
        """How the base is held and computes, for a status line: '4-bit NF4,
        bfloat16 compute' or 'float32'."""
        name = str(self.dtype).replace("torch.", "")
        return f"4-bit NF4, {name} compute" if self.quantized else name

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

    def sampling_model(self, role: str) -> nn.Module:
        """What ``generate`` is called on for a role's answers: the merged inference
        copy where the base is small enough (``fast_sampling``), else the peft model,
        which the caller runs inside ``role(role)``."""
        if not self.fast_sampling:
            return self.peft
        if self._inference_copy is None:
            self._inference_copy = InferenceCopy(self)
        return self._inference_copy.for_role(role)

    def sampling_order(self, roles: Sequence[str]) -> list[str]:
        """``roles`` in the order that merges the inference copy least: the role it
        holds now first (a switch merges every LoRA layer again, 0.1-0.4 s on the
        embedded model on a CPU)."""
        held = self._inference_copy
        return sorted(roles, key=lambda role: not held.holds(role)) if held is not None else list(roles)

    @property
    def depth(self) -> int:
        """Decoder layers of the base model."""
        return len(self.body.layers)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers: int | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states under the active adapter, in float32: after all decoder
        layers, or after the first ``layers`` only (then the final norm), which
        costs that fraction of a forward pass. ``attention_mask`` is a padding
        mask [B, T], or a 4-D additive mask used as it is (with ``position_ids``)."""
        with self._first_layers(layers):
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            use_cache=False)
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
        return self.lm_head(hidden.to(self.dtype)).float()

    # -- adapters on disk: <dir>/adapter_model.safetensors and adapter_config.json as peft
    # saves them (PeftModel.from_pretrained loads the folder), heads.safetensors, workbench.json

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
        self.peft_config(name).save_pretrained(str(tmp))
        record = {"lora": asdict(self.lora), "role": name, "base": self.model_dir, "quantized": self.quantized,
                  "meta": meta or {}}
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=2))
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
                    if head_name == "reward" and part["weight"].shape[0] != head.out_features:
                        self.set_reward_heads(part["weight"].shape[0])  # an ensemble, or one head after one
                        head = self.reward_head
                    head.load_state_dict(part)
        if name == "reward":
            self.has_reward = True
        return read_record(path).get("meta", {})

    def peft_config(self, name: str) -> Any:
        """The adapter's LoraConfig as peft saves it: its target modules as
        resolved on this base, the base named for other tools, for inference."""
        config = copy.deepcopy(self.peft.peft_config[name])
        config.base_model_name_or_path = self.base_name
        config.inference_mode = True
        return config

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


def read_record(path: str | Path) -> dict[str, Any]:
    """The workbench's record of a saved adapter (``RECORD_FILE``; older versions
    kept it in adapter_config.json)."""
    path = Path(path)
    record = path / RECORD_FILE
    if not record.exists():
        record = path / ADAPTER_CONFIG
    try:
        return json.loads(record.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} has no readable adapter record ({exc}): pick another version") from exc


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
