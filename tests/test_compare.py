"""benchmarks/compare.py: the before/after verdict per cell (pure Python, no GPU)."""

import json

from benchmarks import compare


def _rows(times):
    return [{"config": "int8wo", "N": 4096, "K": 4096, "M": m, "us": us} for m, us in times.items()]


def test_a_cell_regresses_only_past_the_run_to_run_spread(tmp_path):
    files = {}
    for name, times in {"b1": {1: 20.0, 16: 30.0}, "b2": {1: 21.0, 16: 30.0},
                        "a1": {1: 20.5, 16: 33.0}, "a2": {1: 21.5, 16: 33.3}}.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(_rows(times)))
    before = compare._load(f"{files['b1']},{files['b2']}")
    after = compare._load(f"{files['a1']},{files['a2']}")
    rows = {r["M"]: r for r in compare.compare(before, after)}
    # M = 1: 2.4 % slower, inside its ~5 % spread; M = 16: 10 % slower, past the 2 % floor
    assert not rows[1]["regressed"] and abs(rows[1]["ratio"] - 21.0 / 20.5) < 1e-9
    assert rows[16]["regressed"] and abs(rows[16]["spread"] - 0.02) < 1e-9
    code = compare.main(["--before", f"{files['b1']},{files['b2']}", "--after", f"{files['a1']},{files['a2']}"])
    assert code == 1


def test_cells_missing_on_one_side_and_failed_rows_are_left_out(tmp_path):
    b, a = tmp_path / "b.json", tmp_path / "a.json"
    b.write_text(json.dumps(_rows({1: 20.0, 16: 30.0})))
    a.write_text(json.dumps(_rows({1: 19.0}) + [{"config": "int8wo", "N": 4096, "K": 4096, "M": 16, "us": None}]))
    rows = compare.compare(compare._load(str(b)), compare._load(str(a)))
    assert [r["M"] for r in rows] == [1] and not rows[0]["regressed"]
    assert compare.main(["--before", str(b), "--after", str(a), "--markdown"]) == 0
