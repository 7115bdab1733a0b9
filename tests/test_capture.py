"""The capture contract (aofx/api.py, aofx/capture.py): layers never share a graph they should not,
layers that cannot be rewritten stay float and are named, ``example_inputs``, ``FqnToConfig``
selection, hooks, and the ambient grad/inference/autocast mode a forward reads. CPU only. One file for
one contract, hence about 500 lines."""

import copy
import dataclasses
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aofx
from aofx.numerics import sqnr
from tests.common import CONFIGS, CONFIGS_WITH_FLOOR, normal_weights, scheme_of, seeded
from tests.install_helpers import (
    AlphaLinear, BF16, Block, MARGIN, ScaledLinear, WEIGHT_ONLY, names_in, quantize, randn,
)


# ---------------------------------------------------------------- capture does not mix layers

class Mixed(nn.Module):
    """The same weight behind four forwards."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(256, 256, dtype=BF16)
        self.scaled = ScaledLinear(256, 256, gain=3.0, dtype=BF16)
        self.small = AlphaLinear(256, 256, alpha=0.5, dtype=BF16)
        self.big = AlphaLinear(256, 256, alpha=2.0, dtype=BF16)
        normal_weights(self.plain)
        for layer in (self.scaled, self.small, self.big):
            layer.load_state_dict(self.plain.state_dict(), strict=False)

    def forward(self, x):
        return {name: layer(x) for name, layer in self.named_children()}


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_each_layer_runs_its_own_forward(cfg, floor):
    model = Mixed()
    ref = copy.deepcopy(model)
    assert quantize(model, cfg) == []
    for name in ("plain", "scaled", "small", "big"):
        assert scheme_of(getattr(model, name)) == type(cfg).__name__, name
    for x in (randn(4, 256), randn(2, 3, 256, seed=2), randn(1, 256, seed=3)):
        want, got = ref(x), model(x)
        for name in want:
            db = sqnr(want[name], got[name])
            assert db > floor - MARGIN, f"{name}: SQNR {db:.1f} dB for input {tuple(x.shape)}"


# ---------------------------------------------------------------- layers that must stay float

class TwiceLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.weight.sum()


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, self.weight * 2, self.bias)


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(256, 256, dtype=BF16)
        self.twice = TwiceLinear(256, 256, dtype=BF16)
        self.doubled = DoubledLinear(256, 256, dtype=BF16)
        self.wn = torch.nn.utils.parametrizations.weight_norm(nn.Linear(256, 256, dtype=BF16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old hook is deprecated
            self.old_wn = torch.nn.utils.weight_norm(nn.Linear(256, 256, dtype=BF16))

    def forward(self, x):
        return {name: layer(x) for name, layer in self.named_children()}


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_weight_used_outside_linear_or_parametrized_stays_float(cfg, floor):
    torch.manual_seed(0)
    model = Odd()
    x = randn(3, 256)
    with torch.no_grad():
        want = model(x)  # (the old weight_norm hook makes the model impossible to deepcopy)
    classes = {name: type(m) for name, m in model.named_children()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    messages = quantize(model, cfg)
    assert len(messages) == 1, messages
    for name in ("twice", "doubled", "wn", "old_wn"):
        assert names_in(messages[0], name), f"{name} not named in:\n{messages[0]}"
    assert not names_in(messages[0], "plain")
    assert scheme_of(model.plain) == type(cfg).__name__
    for name in ("twice", "doubled", "wn", "old_wn"):
        layer = getattr(model, name)
        assert type(layer) is classes[name], name
        assert scheme_of(layer) == ""
    assert isinstance(model.twice.weight, nn.Parameter) and isinstance(model.doubled.weight, nn.Parameter)
    assert torch.nn.utils.parametrize.is_parametrized(model.wn, "weight")
    now = model.state_dict()
    for k, v in state.items():
        if not k.startswith("plain."):
            assert torch.equal(now[k], v), k
    with torch.no_grad():
        got = model(x)
    for name in ("twice", "doubled", "wn", "old_wn"):
        assert torch.equal(got[name], want[name]), name
    assert sqnr(want["plain"], got["plain"]) > floor - MARGIN


@pytest.mark.parametrize("cfg", CONFIGS)
def test_uninitialized_lazy_linear_raises_and_changes_nothing(cfg):
    model = nn.Sequential(nn.Linear(256, 128, dtype=BF16), nn.ReLU(), nn.LazyLinear(64, dtype=BF16))
    classes = [type(m) for m in model]
    first = {k: v.clone() for k, v in model[0].state_dict().items()}
    keys = list(model.state_dict())
    with pytest.raises(ValueError, match=r"2\.weight.*(lazy|initializ)"):
        aofx.quantize_(model, cfg)
    assert [type(m) for m in model] == classes
    assert list(model.state_dict()) == keys
    assert isinstance(model[0].weight, nn.Parameter)
    assert all(torch.equal(model[0].state_dict()[k], v) for k, v in first.items())
    assert isinstance(model[2].weight, nn.parameter.UninitializedParameter)


# ---------------------------------------------------------------- example_inputs

class Custom(nn.Module):
    """Uses its own parameter through F.linear; a float arg, a bool keyword, a Dropout."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(128, 256, generator=seeded(4)) * 0.02)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, scale, flag=False):
        y = F.linear(x, self.w) * scale
        if flag:
            y = torch.tanh(y) - y
        return self.drop(y)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Custom()

    def forward(self, x, scale, flag=False):
        return self.inner(x, scale, flag=flag)


CALLS = [
    ("x1", (0.5,), {}),            # the example's signature
    ("x2", (2.0,), {}),            # another scale, batch 2
    ("x5", (0.5,), {"flag": True}),  # the other flag value, batch 5
    ("x1", (1.5,), {"flag": False}),
    ("x2", (), {"scale": 0.25, "flag": True}),  # scale by keyword
]


def _call(model, xs, name, args, kwargs):
    return model(xs[name], *args, **kwargs)


def _quantized_outer(cfg, train=False):
    """``(quantized Outer, float copy)``, quantized with a batch-1 example in eval (or train) mode."""
    model = Outer().train(train)
    ref = copy.deepcopy(model)
    example = randn(1, 256, dtype=torch.float32, seed=1)
    assert quantize(model, cfg, example_inputs=(example, 0.5)) == []
    assert type(model) is Outer and scheme_of(model.inner) == type(cfg).__name__
    assert isinstance(model.inner, Custom) and "w" not in model.inner._parameters
    return model, ref


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_example_inputs_custom_forward_other_signatures(cfg, floor):
    model, ref = _quantized_outer(cfg)
    model.eval()
    ref.eval()
    xs = {f"x{b}": randn(b, 256, dtype=torch.float32, seed=b) for b in (1, 2, 5)}
    deq = copy.deepcopy(ref)
    deq.inner.w.data = model.inner.w.detach().clone()  # the float model with the dequantized weight
    for name, args, kwargs in CALLS:
        got = _call(model, xs, name, args, kwargs)
        db = sqnr(_call(ref, xs, name, args, kwargs), got)
        assert db > floor - MARGIN, f"{name} {args} {kwargs}: SQNR {db:.1f} dB"
        if isinstance(cfg, WEIGHT_ONLY):
            torch.testing.assert_close(got, _call(deq, xs, name, args, kwargs), rtol=1e-4, atol=1e-5)
        assert torch.equal(_call(model, xs, name, args, kwargs), got)  # eval: deterministic
    assert torch.equal(model(x=xs["x2"], scale=2.0), model(xs["x2"], 2.0))  # all by keyword


DROPOUT_CONFIGS = [c for c in CONFIGS_WITH_FLOOR if c.id in ("int4wo-32", "int8dq", "fp8wo")]


@pytest.mark.parametrize("train", [False, True], ids=["example-in-eval", "example-in-train"])
@pytest.mark.parametrize("cfg,floor", DROPOUT_CONFIGS)
def test_example_inputs_dropout_follows_train_eval(cfg, floor, train):
    """The example's own signature, run in the other mode first: eval is deterministic and matches
    the float model; train drops about half (the rest doubled), differently on each call."""
    model = Outer().train(train)
    ref = copy.deepcopy(model).eval()
    x = randn(64, 256, dtype=torch.float32, seed=9)
    assert quantize(model, cfg, example_inputs=(x, 1.0)) == []

    def check_eval():
        model.eval()
        clean = model(x, 1.0)
        assert torch.equal(model(x, 1.0), clean), "eval mode: dropout is still on"
        assert sqnr(ref(x, 1.0), clean) > floor - MARGIN
        return clean

    def check_train(clean):
        model.train()
        a, b = model(x, 1.0), model(x, 1.0)
        assert not torch.equal(a, b), "train mode: dropout is off"
        kept = a != 0
        assert 0.35 < kept.float().mean().item() < 0.65
        if clean is not None:
            torch.testing.assert_close(a[kept], 2 * clean[kept], rtol=1e-4, atol=1e-5)

    if train:
        clean = check_eval()
        check_train(clean)
    else:
        check_train(None)
        check_train(check_eval())


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_example_inputs_compile_seen_signature(cfg, floor, fresh_dynamo):
    model, ref = _quantized_outer(cfg)
    model.eval()
    ref.eval()
    x = randn(2, 256, dtype=torch.float32, seed=2)
    y = model(x, 2.0)  # seen eagerly
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x, 2.0)
    torch.testing.assert_close(got, y, rtol=1e-4, atol=1e-5)
    assert sqnr(ref(x, 2.0), got) > floor - MARGIN


@pytest.mark.parametrize("cfg,floor", CONFIGS_WITH_FLOOR)
def test_example_inputs_sequential(cfg, floor):
    model = normal_weights(nn.Sequential(nn.Linear(256, 128, dtype=BF16), nn.ReLU(), nn.Linear(128, 64, dtype=BF16)))
    ref = copy.deepcopy(model)
    assert quantize(model, cfg, example_inputs=(randn(1, 256),)) == []
    assert type(model) is nn.Sequential
    assert scheme_of(model[0]) == scheme_of(model[2]) == type(cfg).__name__
    for x in (randn(1, 256, seed=2), randn(5, 256, seed=3), randn(2, 3, 256, seed=4)):
        db = sqnr(ref(x), model(x))
        assert db > floor - 2 * MARGIN, f"SQNR {db:.1f} dB for {tuple(x.shape)}"  # two layers


# ---------------------------------------------------------------- FqnToConfig

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(256, dtype=BF16)
        self.lin = nn.Sequential(nn.Linear(256, 128, dtype=BF16), nn.ReLU(), nn.Linear(128, 64, dtype=BF16))

    def forward(self, x):
        return self.lin(self.norm(x))


def test_fqn_key_matching_nothing_is_named():
    model = Net()
    messages = quantize(model, aofx.FqnToConfig({"lin.7": aofx.Int8WeightOnlyConfig(),
                                                 "re:nothing\\..*": aofx.Int8WeightOnlyConfig(),
                                                 "lin.0": aofx.Int8WeightOnlyConfig()}))
    assert len(messages) == 1
    assert "lin.7" in messages[0] and "re:nothing\\..*" in messages[0]
    assert scheme_of(model.lin[0]) == "Int8WeightOnlyConfig" and scheme_of(model.lin[2]) == ""


@pytest.mark.parametrize("cfg", CONFIGS)
def test_fqn_parameter_key_quantizes_that_layer(cfg):
    model = Net()
    assert quantize(model, aofx.FqnToConfig({"lin.0.weight": cfg})) == []
    assert scheme_of(model.lin[0]) == type(cfg).__name__
    assert scheme_of(model.lin[2]) == "" and isinstance(model.lin[2].weight, nn.Parameter)
    assert type(model.norm) is nn.LayerNorm and type(model.conv) is nn.Conv2d


def test_fqn_key_on_non_linear_with_builtin_config_is_named():
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("norm.", "conv."))}
    messages = quantize(model, aofx.FqnToConfig({"norm": aofx.Int8WeightOnlyConfig(),
                                                 "conv": aofx.Int4WeightOnlyConfig(group_size=32),
                                                 "lin.2": aofx.Int8WeightOnlyConfig()}))
    assert len(messages) == 1
    assert names_in(messages[0], "norm") and names_in(messages[0], "conv"), messages[0]
    assert type(model.norm) is nn.LayerNorm and type(model.conv) is nn.Conv2d
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert scheme_of(model.lin[2]) == "Int8WeightOnlyConfig" and scheme_of(model.lin[0]) == ""


@dataclasses.dataclass
class TagConfig(aofx.AOBaseConfig):
    tag: str = ""


_TAGGED = []


@aofx.register_quantize_module_handler(TagConfig)
def _tag(module, config):
    _TAGGED.append((module, config))
    module.tag = config.tag
    return module


def test_registered_handler_reaches_non_linear_modules_by_fqn():
    _TAGGED.clear()
    model = Net()
    conv, norm = model.conv, model.norm
    cfg_conv, cfg_norm = TagConfig("c"), TagConfig("n")
    messages = quantize(model, aofx.FqnToConfig({"conv": cfg_conv, "norm": cfg_norm,
                                                 "_default": aofx.Int8WeightOnlyConfig()}))
    assert messages == []
    assert len(_TAGGED) == 2
    assert {(id(m), id(c)) for m, c in _TAGGED} == {(id(conv), id(cfg_conv)), (id(norm), id(cfg_norm))}
    assert model.conv.tag == "c" and model.norm.tag == "n"
    assert scheme_of(model.lin[0]) == scheme_of(model.lin[2]) == "Int8WeightOnlyConfig"


# ---------------------------------------------------------------- hooks

@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_hooks_registered_before_quantize_run_once(cfg):
    model = Block()
    normal_weights(model)
    calls = {"up": 0, "scaled": 0, "pre": 0}

    def count(name):
        def hook(module, args, output):
            calls[name] += 1
            return output * 2 if name == "up" else None
        return hook

    def pre(module, args):
        calls["pre"] += 1

    ref = copy.deepcopy(model)
    model.up.register_forward_hook(count("up"))
    model.scaled.register_forward_hook(count("scaled"))
    model.down.register_forward_pre_hook(pre)
    ref.up.register_forward_hook(lambda m, a, out: out * 2)
    assert quantize(model, cfg) == []
    calls.update(up=0, scaled=0, pre=0)
    x = randn(4, 256)
    for n in range(1, 4):
        model(x if n != 2 else randn(2, 3, 256, seed=2))
        assert calls == {"up": n, "scaled": n, "pre": n}
    assert sqnr(ref(x), model(x)) > 10  # the doubling hook applies (without it: about 6 dB)


# ---------------------------------------------------------------- graphs shared between layers

def _aofx_ops(model, x) -> int:
    ep = torch.export.export(model, (x,))
    return sum(str(n.target).startswith("aofx.") for n in ep.graph.nodes)


def test_shared_graphs_only_serve_their_own_shape():
    cfg = aofx.Int8WeightOnlyConfig()
    first = nn.Sequential(nn.Linear(128, 64, dtype=BF16))
    aofx.quantize_(first, cfg)
    second = nn.Sequential(nn.Linear(256, 64, dtype=BF16), nn.Linear(64, 64, dtype=BF16))
    aofx.quantize_(second, cfg)
    # export straight after quantize_: every layer must find a graph, none may fall back to dequantizing
    assert _aofx_ops(second, randn(3, 256)) == 2


def test_dtype_change_takes_a_graph_for_the_new_dtype():
    model = nn.Sequential(nn.Linear(64, 64, dtype=BF16), nn.ReLU(), nn.Linear(64, 32, dtype=BF16))
    aofx.quantize_(model, aofx.Int8WeightOnlyConfig())
    model.half()
    assert _aofx_ops(model, randn(3, 64, dtype=torch.float16)) == 2


def test_unpickled_model_exports_with_aofx_ops_in_a_fresh_process():
    from aofx import install

    model = nn.Sequential(nn.Linear(64, 64, dtype=BF16), nn.ReLU(), nn.Linear(64, 32, dtype=BF16))
    aofx.quantize_(model, aofx.Int4WeightOnlyConfig(group_size=32))
    blob = pickle.dumps(model)
    saved = dict(install._SHARED)
    install._SHARED.clear()  # as in a new process: no shared graph yet
    try:
        loaded = pickle.loads(blob)
        assert _aofx_ops(loaded, randn(3, 64)) == 2  # no layer fell back to dequantizing
    finally:
        install._SHARED.update(saved)


# ---------------------------------------------------------------- ambient torch state

AMBIENT_DB = 30.0  # int8 weight-only gives about 40 dB; a graph baked for the other mode 0 dB or less
GRAD = ("grad", torch.enable_grad)
NO_GRAD = ("no_grad", torch.no_grad)
INFERENCE = ("inference_mode", torch.inference_mode)
AUTOCAST = ("autocast", lambda: torch.autocast("cpu", dtype=BF16))


class GradModeLinear(nn.Linear):
    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y * 2 if torch.is_grad_enabled() else y


class InferenceModeLinear(nn.Linear):
    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y * 7 if torch.is_inference_mode_enabled() else y


class AutocastLinear(nn.Linear):
    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        return y * 5 if torch.is_autocast_enabled("cpu") else y


class Branches(nn.Module):
    """A layer branching on ambient torch state, beside a standard linear and a subclass that reads none."""

    def __init__(self, branch, dtype=BF16):
        super().__init__()
        self.branch = branch(256, 128, dtype=dtype)
        self.plain = nn.Linear(256, 128, dtype=dtype)
        self.scaled = ScaledLinear(256, 128, dtype=dtype)
        normal_weights(self)

    def forward(self, x):
        return {name: layer(x) for name, layer in self.named_children()}


def _matches(ref, model, x, modes):
    for label, mode in modes:
        with mode():
            want, got = ref(x), model(x)
        for name in want:
            db = sqnr(want[name].float(), got[name].float())
            assert db > AMBIENT_DB, f"{name} under {label}: SQNR {db:.1f} dB"


def _check_modes(branch, modes, dtype=BF16):
    """Quantize ``Branches(branch)``, run it under ``modes`` in turn, and return it and its float copy."""
    model = Branches(branch, dtype)
    ref = copy.deepcopy(model)
    assert quantize(model, aofx.Int8WeightOnlyConfig()) == []
    assert scheme_of(model.branch) == "Int8WeightOnlyConfig"
    _matches(ref, model, randn(4, 256, dtype=dtype), modes)
    assert len(model.branch._aofx.captures) == 2  # one per mode, both kept: alternating captures no more
    assert len(model.plain._aofx.captures) == len(model.scaled._aofx.captures) == 1  # they read no mode
    return model, ref


def test_grad_mode_branch_follows_the_callers_mode():
    model, ref = _check_modes(GradModeLinear, [GRAD, NO_GRAD, GRAD, NO_GRAD, GRAD])
    x = randn(2, 3, 256, seed=5)
    _matches(ref, copy.deepcopy(model), x, [NO_GRAD, GRAD])  # the copy shares the graphs and their guards
    _matches(ref, pickle.loads(pickle.dumps(model)), x, [NO_GRAD, GRAD, NO_GRAD])  # captured again


def test_inference_mode_branch_follows_the_callers_mode():
    _check_modes(InferenceModeLinear, [GRAD, INFERENCE, NO_GRAD, INFERENCE, GRAD])


def test_autocast_branch_follows_the_callers_mode():
    _check_modes(AutocastLinear, [GRAD, AUTOCAST, GRAD, AUTOCAST], dtype=torch.float32)


class GradProj(nn.Module):
    """Uses its own weight through F.linear; doubles the result while grad mode is on."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(128, 256, generator=seeded(5)) * 0.02)

    def forward(self, x):
        y = F.linear(x, self.w)
        return y * 2 if torch.is_grad_enabled() else y


def test_example_inputs_unit_branching_on_grad_mode_runs_under_no_grad():
    model = nn.Sequential(GradProj())
    ref = copy.deepcopy(model)
    x = randn(4, 256, dtype=torch.float32, seed=3)
    assert quantize(model, aofx.Int8WeightOnlyConfig(), example_inputs=(x,)) == []  # captured with grad on
    assert scheme_of(model[0]) == "Int8WeightOnlyConfig"
    for label, mode in (NO_GRAD, GRAD, NO_GRAD):
        with mode():
            db = sqnr(ref(x), model(x))
        assert db > AMBIENT_DB, f"under {label}: SQNR {db:.1f} dB"
    assert len(model[0]._aofx.captures) == 2
