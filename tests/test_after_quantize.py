"""What a user does to a model after ``quantize_`` reaches it as it reaches the float model: writes into a
weight read under inference mode or through a tied parameter, hooks on submodules and global module
hooks, objects and functions the forward reads (a config's field, an activation), a bias given later to a
subclass. Each test runs the float model alongside. CPU."""

import copy
import dataclasses
import enum
import functools
import logging
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

import aofx
from aofx.numerics import sqnr
from tests.common import CASES as SCHEMES

CASES = [pytest.param(cfg, floor, id=name) for name, cfg, floor in SCHEMES
         if name in ("int8wo", "int4wo-32", "fp8dq-row")]


def _pair(make, cfg, **kwargs):
    """(float model, quantized deep copy), seeded."""
    torch.manual_seed(0)
    float_model = make()
    model = copy.deepcopy(float_model)
    aofx.quantize_(model, cfg, **kwargs)
    return float_model, model


@pytest.mark.parametrize("cfg,floor", CASES)
def test_a_write_into_a_weight_read_under_inference_mode_reaches_the_layer(cfg, floor):
    ref, layer = _pair(lambda: nn.Linear(64, 32), cfg)
    new = torch.randn(32, 64) / 8
    with torch.inference_mode():
        for m in (ref, layer):
            m.weight.copy_(new)
        x = torch.randn(64, 64)
        assert sqnr(ref(x), layer(x)) > floor - 3  # (without the write: about -2 dB)
    assert sqnr(new, layer.weight) > floor


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 64, bias=False)
        self.dec = nn.Linear(64, 64, bias=False)
        self.dec.weight = self.enc.weight

    def forward(self, x):
        return self.dec(torch.relu(self.enc(x)))


@pytest.mark.parametrize("cfg,floor", CASES)
def test_an_in_place_write_through_one_tied_layer_reaches_both(cfg, floor):
    ref, model = _pair(Tied, cfg)
    new = torch.randn(64, 64) / 8
    with torch.no_grad():
        for m in (ref, model):
            m.enc.weight.copy_(new)
    x = torch.randn(4, 64)
    assert sqnr(ref(x), model(x)) > floor - 6  # two layers deep
    assert sqnr(new, model.dec.weight) > floor and sqnr(new, model.enc.weight) > floor


def test_global_module_hooks_see_the_users_modules_only():
    ref, model = _pair(lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)),
                       aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 64)
    seen = []
    handles = [register_module_forward_pre_hook(lambda m, a: seen.append(("pre", m._get_name()))),
               register_module_forward_hook(lambda m, a, out: seen.append(("post", m._get_name())))]
    try:
        ref(x)
        want, seen[:] = list(seen), []
        model(x)
        assert seen == want
    finally:
        for h in handles:
            h.remove()
    # a global pre-hook that clamps every module's first input clamps x, never a layer's internals
    with torch.no_grad():
        ref[0].bias.mul_(10)
        model[0].bias.mul_(10)
    handle = register_module_forward_pre_hook(lambda m, a: (a[0].clamp(-1, 1), *a[1:]))
    try:
        assert sqnr(ref(x), model(x)) > 35
    finally:
        handle.remove()


class Adapted(nn.Linear):
    """An nn.Linear subclass with an activation and an adapter as children."""

    def __init__(self):
        super().__init__(64, 64)
        self.act = nn.GELU()
        self.down = nn.Linear(64, 8, bias=False)
        self.up = nn.Linear(8, 64, bias=False)

    def forward(self, x):
        return self.act(super().forward(x)) + self.up(self.down(x))


def test_a_unit_whose_submodule_has_hooks_is_named_and_its_hooks_keep_firing():
    torch.manual_seed(0)
    model = Adapted()
    calls = []
    model.act.register_forward_hook(lambda m, a, out: calls.append(1))
    with pytest.warns(UserWarning, match=r"\(the model\): hooks on act would run only while"):
        aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    assert type(model).__name__ == "Adapted"  # left float
    calls.clear()
    model(torch.randn(4, 64))
    model(torch.randn(4, 64))
    assert calls == [1, 1]


@pytest.mark.parametrize("cfg,floor", CASES)
def test_hooks_given_to_a_submodule_after_quantize_fire_on_every_call(cfg, floor):
    ref, model = _pair(Adapted, cfg)
    assert type(model).__name__ == "QuantizedAdapted"
    x = torch.randn(4, 64)
    model(x)  # captured
    state = {"scale": 3.0}
    calls = []
    for m in (ref, model):
        m.act.register_forward_hook(lambda mod, a, out: out * state["scale"])
    model.act.register_forward_hook(lambda mod, a, out: calls.append(1))
    for scale in (3.0, 1.0, -2.0):
        state["scale"] = scale
        assert sqnr(ref(x), model(x)) > floor
    assert calls == [1, 1, 1]


@dataclasses.dataclass
class Settings:
    scale: float = 1.0


class Configured(nn.Linear):
    """Reads an object's field and a stored function, as transformers' modules read their config."""

    def __init__(self):
        super().__init__(64, 32)
        self.config = Settings()
        self.act_fn = torch.relu
        self.post = functools.partial(torch.clamp, min=-1.0)

    def forward(self, x):
        return self.post(self.act_fn(super().forward(x)) * self.config.scale)


CONFIG_CHANGES = {
    "a field of the config object": lambda m: setattr(m.config, "scale", 3.0),
    "the config object replaced": lambda m: setattr(m, "config", Settings(scale=-2.0)),
    "the function replaced": lambda m: setattr(m, "act_fn", torch.tanh),
    "the partial replaced": lambda m: setattr(m, "post", functools.partial(torch.clamp, min=0.5)),
}


@pytest.mark.parametrize("change", CONFIG_CHANGES)
@pytest.mark.parametrize("cfg,floor", CASES)
def test_objects_the_forward_reads_are_read_again_when_changed(cfg, floor, change, fresh_dynamo):
    ref, model = _pair(Configured, cfg)
    x = torch.randn(4, 64)
    assert sqnr(ref(x), model(x)) > floor
    for m in (ref, model):
        CONFIG_CHANGES[change](m)
    assert sqnr(ref(x), model(x)) > floor
    assert sqnr(ref(x), torch.compile(model, fullgraph=True, backend="aot_eager")(x)) > floor


def test_a_deep_copy_with_equal_objects_shares_the_graph():
    _, model = _pair(Configured, aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 64)
    model(x)
    twin = copy.deepcopy(model)
    assert twin.config is not model.config
    ep = torch.export.export(twin, (x,))  # no eager call first: the shared graph accepts the copy
    assert sum(str(n.target).startswith("aofx.") for n in ep.graph.nodes) == 1


class Shifted(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + 1


@pytest.mark.parametrize("cfg,floor", CASES)
def test_a_bias_given_later_to_a_subclass_is_added_and_removed(cfg, floor):
    ref, layer = _pair(lambda: Shifted(64, 32, bias=False), cfg)
    x = torch.randn(4, 64)
    layer(x)
    bias = torch.full((32,), 3.0)
    for m in (ref, layer):
        m.bias = nn.Parameter(bias.clone())
    assert sqnr(ref(x), layer(x)) > floor
    for m in (ref, layer):
        m.bias = None
    assert sqnr(ref(x), layer(x)) > floor


class Counted:
    """A helper object whose counter changes between calls; the forward reads only its factor."""

    def __init__(self):
        self.calls, self.factor = 0, 2.0


class Helped(nn.Linear):
    def __init__(self):
        super().__init__(64, 32)
        self.helper = Counted()

    def forward(self, x):
        return super().forward(x) * self.helper.factor


def test_state_that_changes_on_every_call_stops_capturing_after_32_graphs():
    ref, layer = _pair(Helped, aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 64)
    with pytest.warns(UserWarning, match="captured 32 times"):
        for step in range(36):
            for m in (ref, layer):
                m.helper.factor = 1.0 + step  # a field the forward reads, changed by its loop on every call
            assert sqnr(ref(x), layer(x)) > 35
    assert len(layer._aofx.captures) == 32


def test_global_module_hooks_reach_the_submodules_of_a_layer_with_its_own_forward():
    ref, model = _pair(Adapted, aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 64)
    model(x)  # captured
    seen = []
    handle = register_module_forward_hook(lambda m, a, out: seen.append(m._get_name()))
    try:
        ref(x)
        want, seen[:] = list(seen), []
        model(x)
        assert seen == want and "GELU" in seen
    finally:
        handle.remove()
    assert sqnr(ref(x), model(x)) > 35


def test_fields_of_an_object_the_forward_never_reads_do_not_capture_again():
    ref, layer = _pair(Helped, aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 64)
    for step in range(4):
        for m in (ref, layer):
            m.helper.calls = step
        assert sqnr(ref(x), layer(x)) > 35
    assert len(layer._aofx.captures) == 1
    for m in (ref, layer):
        m.helper.factor = -1.0  # the field it reads
    assert sqnr(ref(x), layer(x)) > 35 and len(layer._aofx.captures) == 2
    assert type(layer.helper) is Counted  # the trace's recording class is gone


class ConfiguredHead(nn.Module):
    """A user module of a transformers model: keeps the model's config, uses its own weight via F.linear."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.randn(64, 64) / 8)

    def forward(self, x):
        return F.linear(x, self.weight) * self.config.initializer_range * 50


def test_a_unit_reading_a_transformers_config_exports_and_compiles_right_after_quantize(fresh_dynamo):
    from transformers import LlamaConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), ConfiguredHead(LlamaConfig(hidden_size=64)))
    x = torch.randn(2, 8, 64)
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig(), example_inputs=(x,))
    assert model[1].config._is_quantized  # set after the capture, and not read by the forward
    ep = torch.export.export(model, (x,))  # no eager call first
    assert sum(str(n.target).startswith("aofx.") for n in ep.graph.nodes) == 2
    want = model(x)
    assert len(model[1]._aofx.captures) == 1
    torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="aot_eager")(x), want)


class Logged(nn.Linear):
    """Holds objects torch.compile reads differently: a logger, an enum, a SimpleNamespace."""

    def __init__(self):
        super().__init__(64, 32)
        self.log = logging.getLogger("aofx.tests")
        self.mode = Mode.PLUS
        self.ns = types.SimpleNamespace(scale=1.0)

    def forward(self, x):
        self.log.debug("forward")
        y = super().forward(x) * self.ns.scale
        return y if self.mode is Mode.PLUS else -y


class Mode(enum.Enum):
    PLUS = 1
    MINUS = 2


def test_held_loggers_enums_and_namespaces_compile_and_follow_changes(fresh_dynamo):
    ref, layer = _pair(Logged, aofx.Int8WeightOnlyConfig())
    x = torch.randn(4, 64)
    for change in (lambda m: setattr(m, "mode", Mode.MINUS), lambda m: setattr(m.ns, "scale", 3.0)):
        for m in (ref, layer):
            change(m)
        assert sqnr(ref(x), layer(x)) > 35
    assert sqnr(ref(x), torch.compile(layer, fullgraph=True, backend="aot_eager")(x)) > 35
