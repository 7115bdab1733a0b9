"""Graph expectations for the rewrite passes: before/after graphs, node counts, rewrite counts."""

import collections

import expecttest
import torch
from torch import nn

import aofx
from aofx.capture import export_unit
from aofx.passes._graph import Target, drop_unused_inputs, thread_targets
from aofx.registry import find_pass


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 64, dtype=torch.bfloat16)
        self.o = nn.Linear(64, 32, bias=False, dtype=torch.bfloat16)

    def forward(self, x):
        with torch.no_grad():
            h = self.q(x)
        return self.o(torch.relu(h))


def _counts(gm):
    return collections.Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")


def _code(gm):
    return "\n".join(line.rstrip() for line in gm.code.strip().splitlines() if line.strip())


class TestInt4Pass(expecttest.TestCase):
    def test_rewrite_in_graph_and_no_grad_subgraph(self):
        config = aofx.Int4WeightOnlyConfig(group_size=32)
        rewrite = find_pass(config)
        capture = export_unit(Block(), (torch.randn(2, 64).bfloat16(),))
        self.assertExpectedInline(_code(capture.gm), """\
def forward(self, p_m_q_weight, p_m_q_bias, p_m_o_weight, leaves_0):
    submod_3 = self.submod_1
    linear = torch.ops.higher_order.wrap_with_set_grad_enabled(False, submod_3, leaves_0, p_m_q_weight, p_m_q_bias);  submod_3 = leaves_0 = p_m_q_weight = p_m_q_bias = None
    getitem = linear[0];  linear = None
    relu = torch.ops.aten.relu.default(getitem);  getitem = None
    linear_1 = torch.ops.aten.linear.default(relu, p_m_o_weight);  relu = p_m_o_weight = None
    return (linear_1,)""")

        targets = {}
        for layer in ("q", "o"):
            node = capture.state_placeholders()[f"{layer}.weight"]
            packed = [capture.add_state_input(f"{layer}.{k}", node) for k in rewrite.packed_names]
            targets[node] = Target(rewrite, config, packed)
        counts = [rewrite(gm, local) for gm, local in thread_targets(capture.gm, targets)]
        drop_unused_inputs(capture.gm)
        capture.finalize()
        self.assertEqual(counts, [1, 1])  # one in the top graph, one in the no_grad subgraph
        self.assertExpectedInline(_code(capture.gm), """\
def forward(self, p_m_q_bias, leaves_0, q_qdata, q_scale, q_zero, o_qdata, o_scale, o_zero):
    submod_3 = self.submod_1
    linear = torch.ops.higher_order.wrap_with_set_grad_enabled(False, submod_3, leaves_0, p_m_q_bias, q_qdata, q_scale, q_zero);  submod_3 = leaves_0 = p_m_q_bias = q_qdata = q_scale = q_zero = None
    getitem = linear[0];  linear = None
    relu = torch.ops.aten.relu.default(getitem);  getitem = None
    int4_weight_only_linear_default = torch.ops.aofx.int4_weight_only_linear.default(relu, o_qdata, o_scale, o_zero, 32, None);  relu = o_qdata = o_scale = o_zero = None
    return (int4_weight_only_linear_default,)""")
        self.assertEqual(_counts(capture.gm.submod_1),
                         {"aofx.int4_weight_only_linear.default": 1})
        self.assertEqual(_counts(capture.gm)["aten.linear.default"], 0)
        self.assertEqual([kind for kind, _ in capture.order], ["state", "input", "state", "state", "state",
                                                               "state", "state", "state"])


class FBlock(nn.Module):
    """Owns its weights and calls F.linear itself, one call under no_grad: a capture unit."""

    def __init__(self):
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(64, 64, dtype=torch.bfloat16) * 0.02)
        self.w_out = nn.Parameter(torch.randn(32, 64, dtype=torch.bfloat16) * 0.02)

    def forward(self, x):
        with torch.no_grad():
            h = torch.nn.functional.linear(x, self.w_in)
        return torch.nn.functional.linear(torch.relu(h), self.w_out)


def _graph(module):
    (capture,) = module._aofx.captures
    return capture.gm


class TestEveryPass(expecttest.TestCase):
    def test_node_counts_per_scheme(self):
        cases = {
            "Int4WeightOnlyConfig": ("aofx.int4_weight_only_linear.default", aofx.Int4WeightOnlyConfig(32)),
            "Int8WeightOnlyConfig": ("aofx.int8_weight_only_linear.default", aofx.Int8WeightOnlyConfig()),
            "Int8DynamicActivationInt8WeightConfig": ("aofx.int8_dynamic_activation_int8_weight_linear.default",
                                                      aofx.Int8DynamicActivationInt8WeightConfig()),
            "Float8WeightOnlyConfig": ("aofx.float8_weight_only_linear.default", aofx.Float8WeightOnlyConfig()),
            "Float8DynamicActivationFloat8WeightConfig": (
                "aofx.float8_dynamic_activation_float8_weight_linear.default",
                aofx.Float8DynamicActivationFloat8WeightConfig(granularity=aofx.PerRow())),
        }
        for name, (op, config) in cases.items():
            unit, layers = FBlock(), Block()
            aofx.quantize_(unit, config, example_inputs=(torch.randn(2, 64).bfloat16(),))
            gm = _graph(unit)
            self.assertEqual(_counts(gm)[op] + _counts(gm.submod_1)[op], 2, name)
            self.assertEqual(_counts(gm)["aten.linear.default"] + _counts(gm.submod_1)["aten.linear.default"], 0)
            self.assertEqual(sorted(unit.state_dict()), sorted(f"{w}_{k}" for w in ("w_in", "w_out")
                                                               for k in find_pass(config).packed_names))
            # a standard nn.Linear's capture holds exactly one op and no linear
            aofx.quantize_(layers, config)
            self.assertEqual(_counts(_graph(layers.o)), {op: 1}, name)

    def test_fp8_dynamic_op_arguments(self):
        model = nn.Linear(32, 32, bias=False, dtype=torch.bfloat16)
        aofx.quantize_(model, aofx.Float8DynamicActivationFloat8WeightConfig(granularity=(aofx.PerRow(),
                                                                                           aofx.PerTensor())))
        self.assertExpectedInline(_code(_graph(model)), """\
def forward(self, leaves_0, qdata, scale):
    float8_dynamic_activation_float8_weight_linear_default = torch.ops.aofx.float8_dynamic_activation_float8_weight_linear.default(leaves_0, qdata, scale, True, None);  leaves_0 = qdata = scale = None
    return (float8_dynamic_activation_float8_weight_linear_default,)""")
        self.assertEqual(model.scale.shape, ())


class MatmulLinear(nn.Linear):
    """A Linear subclass whose forward is ``x @ W.T`` (as FalconLinear's), in the spelling ``how`` picks."""

    def __init__(self, how):
        super().__init__(64, 32, dtype=torch.bfloat16)
        self.how = how

    def forward(self, x):
        if self.how == "T":
            y = x @ self.weight.T
        elif self.how == "transpose":
            y = torch.matmul(x, self.weight.transpose(-1, -2))
        elif self.how == "permute":
            y = torch.matmul(x, self.weight.permute(1, 0))
        elif self.how == "mm":
            y = torch.mm(x.reshape(-1, 64), self.weight.t()).reshape(*x.shape[:-1], 32)
        else:  # reads the weight a second time: it must stay float
            y = x @ self.weight.T + self.weight.sum()
        return y + self.bias


class TestMatmulOfTransposedWeight(expecttest.TestCase):
    def test_rewritten_like_a_linear(self):
        x = torch.randn(2, 3, 64).bfloat16()
        for how in ("T", "transpose", "permute", "mm"):
            layer = MatmulLinear(how)
            ref = layer(x)
            aofx.quantize_(layer, aofx.Int8WeightOnlyConfig())
            counts = _counts(_graph(layer))  # captured with quantize_'s example rows
            self.assertEqual(counts["aofx.int8_weight_only_linear.default"], 1, how)
            self.assertEqual(counts["aten.matmul.default"] + counts["aten.mm.default"], 0, how)
            self.assertFalse({"aten.t.default", "aten.numpy_T.default", "aten.transpose.int",
                              "aten.permute.default"} & set(counts), how)
            self.assertGreater(aofx.numerics.sqnr(ref.float(), layer(x).float()), 38.0, how)
        # the capture for x's 3-D shape (the first one, from quantize_'s example rows, is 2-D)
        self.assertExpectedInline(_code(layer._aofx.captures[-1].gm), """\
def forward(self, p_m_bias, leaves_0, qdata, scale):
    sym_size_int_2 = torch.ops.aten.sym_size.int(leaves_0, 0)
    sym_size_int_3 = torch.ops.aten.sym_size.int(leaves_0, 1)
    reshape = torch.ops.aten.reshape.default(leaves_0, [-1, 64]);  leaves_0 = None
    int8_weight_only_linear_default = torch.ops.aofx.int8_weight_only_linear.default(reshape, qdata, scale, None);  reshape = qdata = scale = None
    reshape_1 = torch.ops.aten.reshape.default(int8_weight_only_linear_default, [sym_size_int_2, sym_size_int_3, 32]);  int8_weight_only_linear_default = sym_size_int_2 = sym_size_int_3 = None
    add = torch.ops.aten.add.Tensor(reshape_1, p_m_bias);  reshape_1 = p_m_bias = None
    return (add,)""")

    def test_weight_read_twice_stays_float(self):
        layer = MatmulLinear("twice")
        with self.assertWarnsRegex(UserWarning, "uses weight outside F.linear"):
            aofx.quantize_(layer, aofx.Int8WeightOnlyConfig())
        self.assertIs(type(layer), MatmulLinear)
