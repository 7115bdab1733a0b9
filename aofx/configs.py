"""Quantization configs: what to quantize and how, in torchao's vocabulary.

Each config is a dataclass validated in ``__post_init__``; a bad value raises ``ValueError`` (or
``TypeError`` for a wrong type) saying what was given and what is allowed. The snake_case names
(``int4_weight_only`` ...) *are* the config classes, permanently and without warnings.

``config_to_dict`` / ``config_from_dict`` turn a built-in config into a JSON-safe dict and back
(the per-layer config in a safetensors file's metadata); the round trip gives an equal config.
The five configs, their shared validation and the serialization stay in one file (about 450 lines)
so that torchao's config names map to one module.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from aofx.granularity import Granularity, PerRow, PerTensor, as_granularity, is_last_dim_row
from aofx.numerics import GROUP_SIZES


class AOBaseConfig(abc.ABC):
    """Base of every quantization config. Subclass it (as a dataclass) for your own scheme and
    register a module handler for it with ``register_quantize_module_handler``."""

    version = 1  # torchao's default config version, which a subclass may override with a field


# ---------------------------------------------------------------- torchao's other fields

def _compat(default):
    """A torchao field that aofx accepts for compatibility: left out of ``repr``, equality and saved
    metadata, since every accepted value gives the same aofx scheme."""
    return field(default=default, repr=False, compare=False)


def _token(value) -> str:
    """torchao's enum member (by its name) or string as a lowercase name ("tinygemm", "symmetric")."""
    return str(getattr(value, "name", value)).lower()


def _check_compat(config, name: str, allowed: tuple | None = None, why: str = "") -> None:
    """``config.<name>`` must be one of ``allowed`` (None: anything); raises ``ValueError`` saying why not."""
    value = getattr(config, name)
    if allowed is not None and (value if value is None or isinstance(value, bool) else _token(value)) not in allowed:
        raise ValueError(f"{type(config).__name__}: {name}={value!r} is not supported by aofx ({why}); "
                         f"accepted: {', '.join(map(repr, allowed))}")


def _check_common(config) -> None:
    """``set_inductor_config`` (any bool: aofx sets no Inductor flags) and ``version`` (1 or 2: torchao's
    tensor format; aofx has its own)."""
    if not isinstance(config.set_inductor_config, bool):
        raise TypeError(f"{type(config).__name__}: set_inductor_config must be a bool, "
                        f"got {config.set_inductor_config!r}")
    if config.version not in (1, 2):
        raise ValueError(f"{type(config).__name__}: version={config.version!r} is not one of torchao's (1, 2)")


def _per_row_only(config, why: str, per_row: bool = True) -> None:
    """torchao's ``granularity`` field of a per-channel scheme: ``PerRow()``, an (activation, weight)
    list of them, or None, which reads back as torchao's default ``PerRow()`` (None for a grouped scheme)."""
    g = config.granularity
    if g is None:
        config.granularity = PerRow() if per_row else None
        return
    pair = isinstance(g, (list, tuple))
    given = [as_granularity(x) for x in (g if pair else [g])]
    if len(given) != (2 if pair else 1) or not all(map(is_last_dim_row, given)):
        raise ValueError(f"{type(config).__name__}: granularity={g!r} is not supported; {why}")
    config.granularity = type(g)(given) if pair else given[0]


def _version_2(config) -> None:
    """torchao 0.18 removed version 1 of its int8 configs; asking for it raises there too."""
    if config.version == 1:
        raise ValueError(f"version 1 of {type(config).__name__} has been removed (as in torchao); use version=2")


class UnsupportedVersionError(ValueError, AssertionError):
    """A config version that torchao 0.18 builds but whose ``quantize_`` fails (an ``AssertionError``
    there); a ``ValueError`` too, as aofx's other refusals of a config value."""


def check_version(config) -> None:
    """torchao 0.18 removed version 1 of the int4 and fp8 configs: it builds them, and its ``quantize_``
    asserts ``version == 2``. ``quantize_`` calls this before changing anything."""
    if isinstance(config, (Int4WeightOnlyConfig, Float8WeightOnlyConfig, Float8DynamicActivationFloat8WeightConfig)) \
            and config.version != 2:
        name = type(config).__name__
        raise UnsupportedVersionError(f"Unexpected version: {config.version!r} (torchao 0.18 removed version "
                                      f"{config.version!r} of {name}, and its quantize_ refuses it too); use "
                                      "version=2, the default; nothing was quantized")


def _check_group_size(config, group_size, allow_none: bool) -> None:
    if group_size is None and allow_none:
        return
    allowed = ", ".join(map(str, GROUP_SIZES)) + (" or None (per channel)" if allow_none else "")
    # 128.0 == 128 and True == 1: only an integer that is not a bool is a group size
    if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral)):
        raise TypeError(f"{type(config).__name__}: group_size={group_size!r} ({type(group_size).__name__}) "
                        f"is not an int; use {allowed}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"{type(config).__name__}: group_size={group_size!r} is not supported; use {allowed}")


@dataclass
class Int4WeightOnlyConfig(AOBaseConfig):
    """int4 weights, asymmetric per group of ``group_size`` input features; bf16 or fp16 activations
    (other float dtypes run the pure-torch reference).

    Fields:
        group_size (int, default 128): input features that share one bf16 scale and zero point;
            one of 32, 64, 128, 256, and it must divide the layer's in_features. A float (128.0)
            or bool is a ``TypeError``, any other int a ``ValueError``.

    torchao's other fields are accepted and change nothing: ``set_inductor_config`` (any bool),
    ``version`` (2; 1 builds, as in torchao 0.18, and ``quantize_`` refuses it with
    ``UnsupportedVersionError``), ``int4_packing_format`` (plain, preshuffled, plain_int32 or
    tile_packed_to_4d: aofx has its own layout), ``int4_tile_packed_ntile``, and
    ``int4_choose_qparams_algorithm`` ("tinygemm" only, which is what aofx computes; "hqq" is a
    ``ValueError``). They are left out of ``repr``, equality and saved metadata.
    """

    group_size: int = 128
    set_inductor_config: bool = _compat(True)
    int4_packing_format: Any = _compat("plain")
    int4_choose_qparams_algorithm: Any = _compat("tinygemm")
    int4_tile_packed_ntile: int = _compat(8)
    version: int = _compat(2)

    def __post_init__(self):
        _check_group_size(self, self.group_size, allow_none=False)
        self.group_size = int(self.group_size)
        _check_common(self)
        _check_compat(self, "int4_packing_format", ("plain", "preshuffled", "plain_int32", "tile_packed_to_4d"),
                      "a packing format is torchao's kernel layout; aofx packs its own")
        _check_compat(self, "int4_choose_qparams_algorithm", ("tinygemm",),
                      "aofx computes tinygemm-style scales and zero points, not HQQ's")


@dataclass
class Int8WeightOnlyConfig(AOBaseConfig):
    """int8 weights, symmetric, with fp32 scales; activations stay in their dtype.

    Fields:
        group_size (int or None, default None): None gives one scale per output channel; an int
            gives one scale per group of that many input features and is one of 32, 64, 128, 256
            (it must divide in_features). A float (128.0) or bool is a ``TypeError``, any other int
            a ``ValueError``.

    torchao's other fields: ``granularity`` (``PerRow()``, the default per-channel scheme, or
    ``PerGroup(n)``, which sets ``group_size=n``; others are a ``ValueError``; it reads back as
    ``PerRow()`` per channel), ``set_inductor_config`` (any bool) and ``version`` (2; 1 is a
    ``ValueError``, as in torchao 0.18) are accepted and left out of ``repr``, equality and metadata.
    """

    group_size: Optional[int] = None
    granularity: Any = _compat(None)
    set_inductor_config: bool = _compat(True)
    version: int = _compat(2)

    def __post_init__(self):
        g = self.granularity
        if type(g).__name__ == "PerGroup":  # torchao's PerGroup(n) is group_size=n
            if self.group_size not in (None, g.group_size):
                raise ValueError(f"Int8WeightOnlyConfig: group_size={self.group_size!r} contradicts granularity={g!r}")
            self.group_size, self.granularity = g.group_size, None
        _check_group_size(self, self.group_size, allow_none=True)
        _per_row_only(self, "use PerRow() (per channel) or group_size", per_row=self.group_size is None)
        if self.group_size is not None:
            self.group_size = int(self.group_size)
        _check_common(self)
        _version_2(self)


@dataclass
class Int8DynamicActivationInt8WeightConfig(AOBaseConfig):
    """int8 activations quantized per token at run time x int8 weights per output channel.

    Activations are symmetric per token (``amax / 127``), weights symmetric per output channel
    (``amax / 127.5``), both with fp32 scales. aofx has no fields of its own here; torchao's are accepted
    where they name this scheme and left out of ``repr``, equality and metadata:
    ``act_mapping_type`` (symmetric only), ``granularity`` (``PerRow()`` or None), ``weight_only_decode``
    and ``reduce_range`` (False only), ``set_inductor_config`` (any bool), ``version`` (2; torchao 0.18
    removed 1). Any other value is a ``ValueError``: it would be another scheme.
    """

    act_mapping_type: Any = _compat("symmetric")
    weight_only_decode: bool = _compat(False)
    granularity: Any = _compat(None)
    set_inductor_config: bool = _compat(True)
    version: int = _compat(2)
    reduce_range: Optional[bool] = _compat(False)

    def __post_init__(self):
        _check_common(self)
        _version_2(self)
        _check_compat(self, "act_mapping_type", ("symmetric",), "activations are quantized symmetrically")
        _check_compat(self, "weight_only_decode", (False,), "decode runs the same dynamic scheme")
        _check_compat(self, "reduce_range", (False, None), "the full int8 range is used")
        _per_row_only(self, "activations are per token and weights per channel (PerRow())")


@dataclass
class Float8WeightOnlyConfig(AOBaseConfig):
    """float8 weights with one fp32 scale per output channel; activations stay in their dtype.

    Fields:
        weight_dtype (torch.dtype, default torch.float8_e4m3fn): the only allowed value is
            ``torch.float8_e4m3fn``.

    torchao's ``set_inductor_config`` (any bool), ``version`` (2; 1 builds, as in torchao 0.18, and
    ``quantize_`` refuses it) and ``granularity`` (``PerRow()`` or None) are accepted and left out of
    ``repr``, equality and metadata.
    """

    weight_dtype: torch.dtype = torch.float8_e4m3fn
    set_inductor_config: bool = _compat(True)
    version: int = _compat(2)
    granularity: Any = _compat(None)

    def __post_init__(self):
        if self.weight_dtype != torch.float8_e4m3fn:
            raise ValueError(f"Float8WeightOnlyConfig: weight_dtype={self.weight_dtype} is not supported; "
                             "use torch.float8_e4m3fn")
        _check_common(self)
        _per_row_only(self, "weights have one scale per output channel (PerRow())")


def _granularity_pair(granularity) -> tuple:
    """torchao's forms -> ``(activation, weight)``: None is PerTensor, a single one is used for both."""
    if granularity is None:
        return (PerTensor(), PerTensor())
    pair = tuple(granularity) if isinstance(granularity, (tuple, list)) else (granularity,) * 2
    pair = tuple(as_granularity(g) for g in pair)
    if len(pair) != 2 or not all(isinstance(g, PerTensor) or is_last_dim_row(g) for g in pair):
        # torchao's wording first (its tests match it): a pair of other types, or another form
        is_pair = len(pair) == 2 and isinstance(granularity, (tuple, list))
        what = "Unsupported granularity types" if is_pair else "Invalid granularity specification"
        raise ValueError(f"Float8DynamicActivationFloat8WeightConfig: {what}: {granularity!r}; granularity must be "
                         "None, PerTensor(), PerRow() or an (activation, weight) pair of them")
    return pair


@dataclass
class Float8DynamicActivationFloat8WeightConfig(AOBaseConfig):
    """float8 activations (scaled at run time) x float8 weights, fp32 scales.

    Fields:
        activation_dtype (torch.dtype, default torch.float8_e4m3fn): only ``torch.float8_e4m3fn``.
        weight_dtype (torch.dtype, default torch.float8_e4m3fn): only ``torch.float8_e4m3fn``.
        granularity (default None): ``None`` (= ``PerTensor()``), ``PerTensor()``, ``PerRow()``,
            or an ``(activation, weight)`` tuple or list of them. It is normalized, as in torchao, to an
            ``[activation, weight]`` list, so ``granularity=PerRow()`` equals
            ``granularity=[PerRow(), PerRow()]`` and ``None`` equals ``PerTensor()``.
            ``PerTensor``: one scale for the activation / the weight; ``PerRow``: one per token /
            per output channel. torchao's own ``PerTensor``/``PerRow`` objects are accepted too.

    torchao's other fields are accepted where they name this scheme and left out of ``repr``, equality and
    metadata: ``packing_format`` ("plain" only), ``activation_value_lb`` / ``activation_value_ub`` (None
    only: a clamped scale is another scheme), and, as kernel choices that aofx makes itself,
    ``mm_config``, ``kernel_preference`` and ``alg_id``; ``set_inductor_config`` (any bool), ``version``
    (2; 1 builds, as in torchao 0.18, and ``quantize_`` refuses it).
    """

    activation_dtype: torch.dtype = torch.float8_e4m3fn
    weight_dtype: torch.dtype = torch.float8_e4m3fn
    granularity: Any = None
    packing_format: Any = _compat("plain")
    mm_config: Any = _compat(None)
    activation_value_lb: Optional[float] = _compat(None)
    activation_value_ub: Optional[float] = _compat(None)
    kernel_preference: Any = _compat("auto")
    set_inductor_config: bool = _compat(True)
    version: int = _compat(2)
    alg_id: int = _compat(0)

    def __post_init__(self):
        for name in ("activation_dtype", "weight_dtype"):
            if getattr(self, name) != torch.float8_e4m3fn:
                raise ValueError(f"Float8DynamicActivationFloat8WeightConfig: {name}={getattr(self, name)} "
                                 "is not supported; use torch.float8_e4m3fn")
        self.granularity = list(_granularity_pair(self.granularity))
        _check_common(self)
        _check_compat(self, "packing_format", ("plain",), "the weight is a plain e4m3 tensor")
        for name in ("activation_value_lb", "activation_value_ub"):
            _check_compat(self, name, (None,), "the activation scale comes from amax alone")

    @property
    def granularities(self) -> tuple[Granularity, Granularity]:
        """``(activation, weight)`` granularity."""
        return _granularity_pair(self.granularity)  # normalized already, unless reassigned since


@dataclass
class FqnToConfig(AOBaseConfig):
    """Per-module (or per-parameter) configs: ``{key: config or None}``.

    Fields, as torchao's dataclass:
        fqn_to_config (dict, default empty): keys are strings, values a config object (not another
            ``FqnToConfig``) or ``None``. A key is one of

            * an exact fully qualified name: a module (``"layers.0.attn.q_proj"``) or a parameter
              (``"layers.0.attn.q_proj.weight"``);
            * ``"re:<regex>"``: a regular expression that must *fullmatch* the fqn; an invalid
              regex is a ``ValueError`` naming the key;
            * ``"_default"``: every selected module no other key covers. torchao deprecates it and
              warns; so does aofx.
        module_fqn_to_config (dict, default empty): torchao's older name for the same table (and
            ``ModuleFqnToConfig`` is this class). Given both, non-empty and different, is a ``ValueError``;
            otherwise the two fields hold one table.
        version (int, default 1): torchao's config version; it changes nothing in aofx.

    Precedence for an fqn: the exact key, then the first ``"re:"`` key in dict order whose regex
    fullmatches it, then ``"_default"``. A value of ``None`` means "leave this module alone" and
    stops the search, so an exact ``None`` beats a matching regex or ``"_default"``. ``quantize_``
    looks up each layer's parameter fqns (``"layers.0.weight"``) before its module fqn, and there, as
    torchao applies every parameter regex that matches, a regex mapped to ``None`` passes to the next.
    """

    fqn_to_config: dict = field(default_factory=dict)
    module_fqn_to_config: dict = field(default_factory=dict, repr=False, compare=False)
    version: int = field(default=1, repr=False, compare=False)

    def __post_init__(self):
        for name in ("fqn_to_config", "module_fqn_to_config"):
            if getattr(self, name) is None:
                setattr(self, name, {})
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"FqnToConfig: {name} must be a dict; got {type(getattr(self, name)).__name__}")
        if self.fqn_to_config and self.module_fqn_to_config and self.fqn_to_config != self.module_fqn_to_config:
            raise ValueError("FqnToConfig: fqn_to_config and module_fqn_to_config (torchao's older name) are both "
                             "given and differ; pass one table")
        self.fqn_to_config = self.module_fqn_to_config = self.fqn_to_config or self.module_fqn_to_config
        if "_default" in self.fqn_to_config:
            warnings.warn("FqnToConfig: '_default' is deprecated in torchao (pytorch/ao#3229) and may go in a future "
                          "release; name the layers, or pass the config itself with a filter_fn", stacklevel=3)
        for key, cfg in self.fqn_to_config.items():
            if not isinstance(key, str):
                raise TypeError(f"FqnToConfig: keys must be strings (fqn, 're:<regex>' or '_default'); got {key!r}")
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as err:
                    raise ValueError(f"FqnToConfig: key {key!r} is not a valid regular expression ({err})") from err
            if cfg is not None and (not isinstance(cfg, AOBaseConfig) or isinstance(cfg, FqnToConfig)):
                raise TypeError(f"FqnToConfig: value for {key!r} must be a config object or None; got {cfg!r}")

    def config_for(self, fqn: str):
        """The config for a module ``fqn`` by the precedence above, or None when it is not covered or is
        skipped (``quantize_`` looks up parameter fqns by a rule of their own: see above)."""
        table = self.fqn_to_config
        if fqn in table:
            return table[fqn]
        for key, cfg in table.items():
            if key.startswith("re:") and re.fullmatch(key[3:], fqn):
                return cfg
        return table.get("_default")


ModuleFqnToConfig = FqnToConfig

# torchao's snake_case names: the classes themselves, so calling one builds the config.
int4_weight_only = Int4WeightOnlyConfig
int8_weight_only = Int8WeightOnlyConfig
int8_dynamic_activation_int8_weight = Int8DynamicActivationInt8WeightConfig
float8_weight_only = Float8WeightOnlyConfig
float8_dynamic_activation_float8_weight = Float8DynamicActivationFloat8WeightConfig


def describe(config: AOBaseConfig) -> str:
    """Short text for ``repr``: the scheme name and its fields."""
    fields = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config) if f.repr) \
        if dataclasses.is_dataclass(config) else ""
    return f"{type(config).__name__}({fields})"


# ---------------------------------------------------------------- serialization

_SERIALIZABLE = {cls.__name__: cls for cls in (
    Int4WeightOnlyConfig, Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Float8WeightOnlyConfig,
    Float8DynamicActivationFloat8WeightConfig)}
_GRANULARITIES = {cls.__name__: cls for cls in (PerTensor, PerRow)}  # PerRow over the last dim only


def config_to_dict(config: AOBaseConfig) -> dict:
    """A built-in config as a JSON-safe dict: ``{"type": class name, field: value, ...}``.

    dtypes become their names (``"float8_e4m3fn"``), granularities a list of class names
    (``["PerRow", "PerTensor"]``, activation first). Other config types (a user's, or
    ``FqnToConfig``) raise ``ValueError``: ``config_from_dict`` could not rebuild them.
    """
    name = type(config).__name__
    if _SERIALIZABLE.get(name) is not type(config):
        raise ValueError(f"config_to_dict: {name} is not serializable; supported: {', '.join(_SERIALIZABLE)}")
    out = {"type": name}
    for f in dataclasses.fields(config):
        if not f.compare:  # torchao's fields that change nothing in aofx
            continue
        value = getattr(config, f.name)
        if isinstance(value, torch.dtype):
            value = str(value).removeprefix("torch.")
        elif f.name == "granularity":
            value = [type(g).__name__ for g in config.granularities]
        out[f.name] = value
    return out


def config_from_dict(d: dict) -> AOBaseConfig:
    """The config ``config_to_dict`` wrote: ``config_from_dict(config_to_dict(c)) == c``.

    Raises ``ValueError`` for an unknown ``"type"``, an unknown field, dtype or granularity name
    (the config's own ``__post_init__`` checks the values)."""
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"config_from_dict: expected a dict with a 'type' key; got {d!r}")
    name = d["type"]
    cls = _SERIALIZABLE.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"config_from_dict: unknown config type {name!r}; supported: {', '.join(_SERIALIZABLE)}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key == "type":
            continue
        if key not in names:
            raise ValueError(f"config_from_dict: {name} has no field {key!r}; its fields: {sorted(names)}")
        if key.endswith("_dtype"):
            dtype = getattr(torch, value, None) if isinstance(value, str) else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"config_from_dict: {name}.{key}={value!r} is not a torch dtype name")
            value = dtype
        elif key == "granularity":
            if not isinstance(value, list) or not all(g in _GRANULARITIES for g in value):
                raise ValueError(f"config_from_dict: {name}.granularity={value!r} must be a list of "
                                 f"{' / '.join(_GRANULARITIES)}")
            value = [_GRANULARITIES[g]() for g in value]
        kwargs[key] = value
    return cls(**kwargs)
