"""Which base model, on which device, in what precision, and the LoRA shape of
its adapters: ``ModelOptions``, part of every job's config. Apart from the
loading code so that the command line and the app can build one without
importing torch."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import UserError

EMBEDDED = "embedded"
# The compute precisions a base can be loaded in (ModelOptions.dtype).
DTYPES = ("float32", "bfloat16", "float16")


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

    source: str = field(default=EMBEDDED, metadata={
        "help": "base model: 'embedded' (SmolLM2-135M-Instruct, the default), a model directory, a .gguf file, "
                "or a hub id"})
    # None: 4-bit NF4 wherever bitsandbytes works (CPU with bitsandbytes >= 0.48, CUDA).
    quantize: bool | None = field(default=None, metadata={
        "help": "load the base in 4-bit NF4 (default: wherever bitsandbytes works)"})
    # None: CUDA when available, else CPU.
    device: str | None = field(default=None, metadata={
        "help": "cpu, cuda, cuda:1 ... (default: CUDA when available)"})
    # None: chosen per device (rlhf.model_stack.compute_dtype).
    dtype: str | None = field(default=None, metadata={
        "help": "compute precision: float32, bfloat16 or float16 (default: bfloat16 on a GPU or CPU that "
                "computes it natively, else float16 on a GPU and float32 on a CPU)"})
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise UserError(f"unknown precision {self.dtype!r}: use one of {', '.join(DTYPES)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelOptions:
        """Read back what ``dataclasses.asdict`` wrote into a job's config."""
        values = dict(values)
        unknown = sorted(set(values) - {"source", "quantize", "device", "dtype", "lora"})
        if unknown:
            raise UserError(f"unknown model option(s) {', '.join(unknown)}: known are source, quantize, device, "
                            "dtype, lora")
        lora = LoraSettings(**values.pop("lora", {}))
        return cls(**values, lora=lora)
