"""The deployment benchmark's pure helpers (``benchmarks/bench_deploy.py``): names, row logic, table, flags."""

import argparse

import pytest

from benchmarks import bench_deploy


@pytest.mark.parametrize("name, short", [
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
])
def test_gpu_short_name(name, short):
    assert bench_deploy.gpu_short_name(name) == short


def _row(**fields):
    return {**bench_deploy.new_row("int8wo", 14336, 4096, 1, 4), **fields}


def test_finish_row_ratios_and_ok():
    row = bench_deploy.finish_row(_row(aoti_us=20.0, compile_us=25.0, bf16_us=45.0, sqnr=60.0))
    assert row["aoti_vs_compile"] == pytest.approx(1.25)  # compile_us / aoti_us: > 1, the package is faster
    assert row["compile_speedup"] == pytest.approx(1.8)  # bf16_us / compile_us
    assert row["ok"] and row["graph"] and row["error"] is None


def test_finish_row_failures():
    eager = bench_deploy.finish_row(_row(aoti_us=20.0, compile_us=25.0, sqnr=60.0, aoti_graph_error="x",
                                         bf16_error="RuntimeError: oom"))
    assert eager["graph"] is False and eager["ok"]  # a bf16 failure alone leaves the aofx row ok
    assert eager["error"] == "bf16: RuntimeError: oom" and eager["compile_speedup"] is None
    low = bench_deploy.finish_row(_row(aoti_us=20.0, compile_us=25.0, sqnr=12.0))
    assert not low["ok"]
    broken = bench_deploy.finish_row(_row(build_error="TypeError: no"))
    assert not broken["ok"] and broken["error"] == "build: TypeError: no" and broken["graph"] is None


def test_format_table_marks_errors():
    rows = [bench_deploy.finish_row(_row(aoti_us=20.0, compile_us=25.0, bf16_us=45.0, sqnr=60.0)),
            bench_deploy.finish_row(_row(M=1024, build_error="TypeError: no"))]
    lines = bench_deploy.format_table(rows).splitlines()
    assert lines[0].split()[:6] == ["config", "NxK", "M", "aoti_us", "compile_us", "bf16_us"]
    assert lines[1].split() == ["int8wo", "14336x4096", "1", "20.0", "25.0", "45.0", "1.25", "1.80", "60.0",
                                "yes", "yes"]
    assert lines[2].split()[-1] == "NO" and lines[-1].endswith("M=1024: build: TypeError: no")


def test_batch_flag_stays_inside_the_exported_dimension():
    assert bench_deploy._parse_batch_ms("1,1024") == [1, 1024]
    with pytest.raises(argparse.ArgumentTypeError):
        bench_deploy._parse_batch_ms("2048")
