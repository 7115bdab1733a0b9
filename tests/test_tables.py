"""benchmarks/tables.py: the README's generated tables, from result rows."""

from benchmarks import tables


def _row(config, tok_s, **extra):
    return {"config": config, "layers": 32, "tok_s": tok_s, "weight_gb": 16.0 if config == "bf16" else 5.0, **extra}


def test_e2e_table_ratios_are_to_each_calls_own_bf16():
    rows = [_row("bf16", 100.0), _row("int4wo-128", 250.0), _row("bf16", 125.0), _row("int8wo", 250.0)]
    lines = tables.e2e_table(rows).splitlines()
    assert lines[0] == "| `bench_e2e.py` call | config | tok/s | × bf16 | weights |"
    assert lines[3] == "|  | int4wo-128 | 250.0 | 2.50 | 5.00 GB |"
    assert lines[5] == "|  | int8wo | 250.0 | 2.00 | 5.00 GB |"
    assert lines[4].startswith("| `--configs bf16,int8wo` | bf16 |")


def test_e2e_table_with_aoti_rows_adds_the_package_against_the_compiled_step():
    rows = [_row("bf16", 100.0, aoti_tok_s=90.0), _row("int4wo-128", 250.0, aoti_tok_s=200.0)]
    lines = tables.e2e_table(rows).splitlines()
    assert lines[0].endswith("| AOTI tok/s | AOTI / compile |")
    assert lines[2] == "| `--configs bf16,int4wo-128 --aoti` | bf16 | 100.0 | 1.00 | 16.00 GB | 90.0 | 0.90 |"
    assert lines[3] == "|  | int4wo-128 | 250.0 | 2.50 | 5.00 GB | 200.0 | 0.80 |"


def test_deploy_table_tells_failed_from_unmeasured_cells():
    def row(config, n, m, aoti_us, ok=True):
        return {"config": config, "N": n, "K": 4096 if n > 4096 else 14336, "M": m, "aoti_us": aoti_us,
                "compile_us": 20.0, "ok": ok}

    rows = [row("int8wo", 14336, 1, 25.0), row("int8wo", 4096, 1, 20.0), row("int8dq", 14336, 1, 10.0, ok=False)]
    assert tables.deploy_table(rows).splitlines() == [
        "| config (14336×4096 · 4096×14336) | M=1 |", "|---|---|",
        "| int8wo | 0.80 · 1.00 |", "| int8dq | fail · n/m |"]


def test_layer_table_says_where_a_peer_fails_and_the_notes_say_why():
    def row(m, **peer):
        return {"config": "int8dq", "N": 14336, "K": 4096, "M": m, "scored": True, "ok": True, "speedup": 1.5,
                "us": 30.0, "bf16_us": 45.0, "target": None, **peer}

    error = "RuntimeError: self.size(0) needs to be greater than 16, but got 1\nsecond line"
    rows = [row(1, torchao_error=error), row(16, torchao_error=error), row(128, torchao_speedup=1.2)]
    lines = tables.layer_table(rows).splitlines()
    assert lines[3] == ("| int8dq | 14336×4096 | 1.50× (30.0 µs)<br>ao fails | 1.50× (30.0 µs)<br>ao fails "
                        "| 1.50× (30.0 µs)<br>ao 1.20 |")
    notes = tables.layer_notes(rows)
    assert ("torchao int8dq 14336×4096 fails at M=1, 16: `RuntimeError: self.size(0) needs to be greater than 16, "
            "but got 1`.") in notes


def test_layer_table_marks_unmeasured_cells_and_keeps_a_slow_peer_nonzero():
    def row(n, m, **peer):
        return {"config": "int8wo", "N": n, "K": 4096 if n > 4096 else 14336, "M": m, "scored": True, "ok": True,
                "speedup": 1.5, "us": 30.0, "bf16_us": 45.0, "target": None, **peer}

    rows = [row(14336, 1, torchao_speedup=2.0), row(14336, 1024, torchao_speedup=0.0012), row(4096, 1)]
    lines = tables.layer_table(rows).splitlines()
    assert lines[4] == "| int8wo | 14336×4096 | 1.50× (30.0 µs)<br>ao 2.00 | 1.50× (30.0 µs)<br>ao 0.0012 |"
    assert lines[5] == "| int8wo | 4096×14336 | 1.50× (30.0 µs) | n/m |"


def test_e2e_table_says_aoti_only_for_calls_that_packaged():
    rows = [_row("bf16", 100.0), _row("int8wo", 200.0), _row("bf16", 110.0, aoti_tok_s=120.0)]
    lines = tables.e2e_table(rows).splitlines()
    assert lines[2] == "| `--configs bf16,int8wo` | bf16 | 100.0 | 1.00 | 16.00 GB | - | - |"
    assert lines[4] == "| `--configs bf16 --aoti` | bf16 | 110.0 | 1.00 | 16.00 GB | 120.0 | 1.09 |"
