"""common.by_m: the per-M config choice, made at run time in exported programs and AOTInductor packages.

The launches here are plain torch (each segment scales the result by its own factor), so the choice a program
made is visible in its output; torch.export, torch.cond and AOTInductor are the real ones, on CPU.
"""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from aofx.kernels.common import _SEGMENTS_UP_TO, by_m, m_segments


def _table(thresholds):
    """A select(m): the index of the first threshold >= m (len(thresholds) above them all)."""
    return lambda m: next((i for i, t in enumerate(thresholds) if m <= t), len(thresholds))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), max_size=5, unique=True).map(sorted), st.integers(1, 300),
       st.integers(0, 6000))
def test_segments_cover_the_range_with_each_m_s_own_choice(thresholds, lo, extra):
    select, hi = _table(thresholds), lo + extra
    segments = m_segments(select, lo, hi)
    assert segments[0][0] == lo and segments[-1][1] == hi
    for (_, last, cfg), (first, _, next_cfg) in zip(segments, segments[1:]):
        assert first == last + 1 and cfg != next_cfg
    for first, last, cfg in segments:
        for m in {first, last, (first + last) // 2}:
            # above _SEGMENTS_UP_TO every table is constant, so the largest M's choice serves there
            assert cfg == select(min(max(m, first), hi) if m <= _SEGMENTS_UP_TO else hi)


THRESHOLDS = {64: (1, 16, 128), 32: (4, 200)}  # per layer width: two tables that cut M differently


class TwoLayers(nn.Module):
    """Two by_m calls whose segments differ (as layers of different shapes have), one with a bias."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1, self.w2 = torch.randn(64, 32, generator=g), torch.randn(32, 64, generator=g)
        self.b1 = torch.randn(64, generator=g)

    @staticmethod
    def launch(cfg, rows, x, w, b):
        y = torch.nn.functional.linear(x, w, b) * (cfg + 1)
        return y + rows * 1e-3  # the segment's last M, as the launch sees it

    def forward(self, x):
        w1, w2 = self.w1, self.w2
        h = by_m(x.shape[0], _table(THRESHOLDS[64]), self.launch, x, w1, self.b1)
        return by_m(h.shape[0], _table(THRESHOLDS[32]), self.launch, h, w2, None)


def _expected(model, x, hi=1024):
    """What a program exported for M <= hi computes: each layer's choice for this M, with rows the last M of
    its range."""
    M = x.shape[0]

    def layer(x, w, b, thresholds):
        cfg = _table(thresholds)(M)
        rows = min(next((t for t in thresholds if M <= t), hi), hi)
        return torch.nn.functional.linear(x, w, b) * (cfg + 1) + rows * 1e-3

    return layer(layer(x, model.w1, model.b1, THRESHOLDS[64]), model.w2, None, THRESHOLDS[32])


def _export(model):
    x = torch.randn(8, 32)
    return torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))


def _count_conds(gm):
    return sum(n.target is torch.ops.higher_order.cond for g in gm.modules() if isinstance(g, torch.fx.GraphModule)
               for n in g.graph.nodes)


BATCHES = [1, 2, 4, 5, 16, 17, 128, 129, 200, 201, 1024]


def test_eager_takes_this_m_s_choice():
    model = TwoLayers()
    for M in BATCHES:
        x = torch.randn(M, 32)
        # eagerly `rows` is M itself
        cfg1, cfg2 = _table(THRESHOLDS[64])(M), _table(THRESHOLDS[32])(M)
        h = torch.nn.functional.linear(x, model.w1, model.b1) * (cfg1 + 1) + M * 1e-3
        torch.testing.assert_close(model(x), torch.nn.functional.linear(h, model.w2) * (cfg2 + 1) + M * 1e-3)


def test_exported_program_chooses_per_m_at_run_time():
    model = TwoLayers()
    ep = _export(model)
    # Export traces M as >= 2, so the chains start at 2: [2, 16], [17, 128], [129, 1024] (2 conds), then
    # [2, 4], [5, 200], [201, 1024] (2 conds). The first layer's M = 1 has a config of its own, chosen by a
    # run-time value (1 cond more); the second's is [2, 4]'s.
    assert [n.target for n in ep.graph.nodes].count(torch.ops.higher_order.cond) == 2
    assert _count_conds(ep.graph_module) == 3 + 2
    for M in BATCHES:
        x = torch.randn(M, 32)
        torch.testing.assert_close(ep.module()(x), _expected(model, x))


def test_a_range_of_one_segment_still_gives_m_1_its_own_choice(tmp_path):
    """Exported for M <= 8, the first layer's M = 2..8 is one segment (no cond on M <= last), and M = 1 still
    takes its own config, in the exported program and in its package."""
    model = TwoLayers()
    ep = torch.export.export(model, (torch.randn(4, 32),),
                             dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    runner = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2")))
    for M in (1, 2, 5, 8):
        x = torch.randn(M, 32)
        torch.testing.assert_close(ep.module()(x), _expected(model, x, hi=8))
        torch.testing.assert_close(runner(x), _expected(model, x, hi=8))


def test_aoti_package_chooses_per_m_at_run_time(tmp_path):
    """The package branches on M in C++; the branch operands are tensors only (ints lifted into a later
    call's branch graph once broke Inductor's cond lowering)."""
    model = TwoLayers()
    path = torch._inductor.aoti_compile_and_package(_export(model), package_path=str(tmp_path / "m.pt2"))
    runner = torch._inductor.aoti_load_package(path)
    for M in BATCHES:
        x = torch.randn(M, 32)
        torch.testing.assert_close(runner(x), _expected(model, x))
