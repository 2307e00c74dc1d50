"""`ntkit report RUN…`: merging results.json files of several seeds / recipes / configs (ntkit.recipes.merge)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from ntkit.cli import main
from ntkit.errors import DataError
from ntkit.recipes.merge import merge_report
from ntkit.recipes.report import comparison_result

_COLUMNS = [
    ("val loss @ 50% vanilla compute", "val_loss_at_budget", 0, "num"),
    ("test loss (best-val ckpt)", "test_loss", None, "num"),
    ("compute to vanilla's best val", "compute_to_target_flops", None, "flops"),
    ("vs vanilla", "compute_ratio_vs_baseline", None, "ratio"),
    ("wall s", "wall_s", None, "secs"),
]
_TITLE = "BERT MLM (synthetic)"
_PAPER = {
    "mat_table1_bert_wikitext2": {
        "source": "seed 001 Table 1",
        "columns": ["test_loss_at_convergence"],
        "rows": {"vanilla": [[4.41, 0.05]], "mat": [[4.27, 0.03]]},
    }
}


def _record(method: str, seed: int) -> dict:
    """A run record with the fields the harness writes that the MAT table reads (docs/results.md)."""
    k = {"vanilla": 0.0, "mat": 1.0}[method]
    test = 6.0 - 0.3 * k + 0.11 * seed + 0.017 * seed * seed
    return {
        "method": method,
        "method_name": method,
        "seed": seed,
        "steps": 8,
        "epochs": 2,
        "test_loss": test,
        "best_val_loss": test - 0.05,
        "val_loss_at_budget": [test + 0.2],
        "budget_fracs": [0.5],
        "compute_to_target_flops": 1e12 * (1.0 - 0.4 * k + 0.05 * seed),
        "compute_ratio_vs_baseline": 1.0 - 0.4 * k + 0.01 * seed,
        "train_flops": 2e12,
        "overhead_flops": 0.0,
        "total_flops": 2e12,
        "overhead_share": 0.01 * k,
        "forward_sparsity": 0.0,
        "backward_sparsity": 0.4 * k,
        "wall_s": 10.0 + seed,
        "convergence_flops": 2e12,
        "test_acc": None,
        "module_names": [],
        "method_history": [],
        "curve": [{"flops": 0.0, "val_loss": test + 1}, {"flops": 2e12, "val_loss": test}],
    }


def _write_run(d: Path, seeds: list[int], *, lr: float = 1e-3, records: list[dict] | None = None) -> Path:
    """A run directory like `ntkit run` writes: results.json (the runner's header + the recipe's
    comparison_result document) and its plots."""
    d.mkdir(parents=True)
    recs = records if records is not None else [_record(m, s) for s in seeds for m in ("vanilla", "mat")]
    res = comparison_result(
        recs, title=_TITLE, columns=_COLUMNS, out_dir=d, paper=_PAPER, paper_key="mat_table1_bert_wikitext2",
        quality=("test_loss", False),
    )
    doc = {
        "recipe": "mat-bert",
        "tier": "ci",
        "config": {"seeds": seeds, "loop": {"lr": lr, "epochs": 2}},
        "overrides": {},
        "data_dir": None,
        "versions": {"ntkit": "0.1.0"},
        "machine": {"hostname": f"box-{d.name}", "cpu_count": 2, "torch_threads": 2, "accelerator": "cpu"},
        "results": res,
        "wall_clock_s": 12.0,
        "finished_utc": "2026-01-01T00:00:00Z",
    }
    (d / "results.json").write_text(json.dumps(doc))
    return d


def _tables(md: str) -> list[list[dict[str, str]]]:
    """Every markdown table of ``md`` as a list of {header: cell} rows."""
    out, block = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split(" | ")])
        elif block:
            head, rows = block[0], block[2:]
            assert all(len(r) == len(head) for r in rows), block  # a well-formed GitHub table
            assert set(block[1]) == {"---"}
            out.append([dict(zip(head, r)) for r in rows])
            block = []
    return out


@pytest.fixture()
def paper_file(tmp_path: Path) -> Path:
    p = tmp_path / "paper_numbers.json"
    p.write_text(json.dumps(_PAPER))
    return p


def test_two_single_seed_runs_merge_to_the_two_seed_runs_numbers(tmp_path: Path, paper_file: Path) -> None:
    a, b = _write_run(tmp_path / "a", [0]), _write_run(tmp_path / "b", [1])
    both = _write_run(tmp_path / "both", [0, 1])
    merged = merge_report([a, b], tmp_path / "out" / "merged.md", paper_numbers=paper_file)
    assert (tmp_path / "out" / "merged.md").read_text() == merged
    table = _tables(merged)[0]
    own = json.loads((both / "results.json").read_text())["results"]["tables"][_TITLE]
    assert [r["method"] for r in table] == ["vanilla", "mat"]
    for mine, theirs in zip(table, own):  # the two-seed run's own report table, cell for cell
        assert mine["seeds"] == "0, 1"
        for col in theirs:
            if col != "seeds":
                assert mine[col] == theirs[col], col
    # … and the cell is the mean ± sample std of the two seeds, computed independently
    tl = [_record("mat", s)["test_loss"] for s in (0, 1)]
    assert table[1]["test loss (best-val ckpt)"] == f"{statistics.mean(tl):.3f} ± {statistics.stdev(tl):.3f}"
    assert table[1]["paper: test_loss_at_convergence"] == "4.27 ± 0.03"
    assert "the papers' published figures" in merged and "own hardware" in merged
    # merging the two-seed run alone gives the same table
    assert _tables(merge_report([both], paper_numbers=paper_file))[0] == table
    # the paper's claim, checked on the pooled seeds as the two-seed run checked it
    own_res = json.loads((both / "results.json").read_text())["results"]
    assert own_res["summary"]["paper's claim"] in merged
    assert _tables(merged)[1] == own_res["tables"]["The paper's claim, per seed"]
    assert [r["seed"] for r in _tables(merged)[1]] == ["0", "1"]
    # machines and relative plot links, valid from the report's folder
    runs = _tables(merged)[2]
    assert [r["machine"].split(",")[0] for r in runs] == ["`box-a`", "`box-b`"]
    assert "[val_loss_vs_compute](../a/val_loss_vs_compute.png)" in runs[0]["plots"]
    assert (tmp_path / "out" / "../a/val_loss_vs_compute.png").is_file()


def test_without_paper_numbers_the_report_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NTKIT_DATA_DIR", raising=False)
    md = merge_report([_write_run(tmp_path / "a", [0])])
    assert "not found" in md and not any(k.startswith("paper:") for k in _tables(md)[0][0])


def test_differing_configs_are_flagged_not_averaged(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", [0], lr=1e-3)
    b = _write_run(tmp_path / "b", [1], lr=5e-4)
    md = merge_report([a, b])
    assert "Warning" in md and "2 different configs" in md
    diff = _tables(md)[0]
    assert diff == [{"key": "config.loop.lr", "config A": "`0.001`", "config B": "`0.0005`"}]
    tables = [t for t in _tables(md) if t and "method" in t[0]]
    assert [[r["seeds"] for r in t] for t in tables] == [["0", "0"], ["1", "1"]]  # one table per config


def test_duplicate_seeds_counted_once_and_conflicts_name_both_files(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", [0])
    same = _write_run(tmp_path / "same", [0])  # the same seed re-run elsewhere: same numbers
    md = merge_report([a, same, a / "results.json"])
    assert _tables(md)[0][0]["seeds"] == "0" and "counted once" in md
    recs = [_record("vanilla", 0), {**_record("mat", 0), "test_loss": 9.0}]
    other = _write_run(tmp_path / "other", [0], records=recs)
    with pytest.raises(DataError) as e:
        merge_report([a, other])
    msg = str(e.value)
    assert "\n" not in msg and str(a / "results.json") in msg and str(other / "results.json") in msg
    assert "'mat' seed 0" in msg and "test loss" in msg


def test_cli_merges_and_rejects_a_bad_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = _write_run(tmp_path / "a", [0]), _write_run(tmp_path / "b", [1])
    assert main(["report", str(a), str(b), "--out", str(tmp_path / "m.md")]) == 0
    assert "| mat | 0, 1 |" in (tmp_path / "m.md").read_text()
    capsys.readouterr()
    assert main(["report", str(a), str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and err.startswith("ntkit: error: report:")
    (tmp_path / "empty").mkdir()
    assert main(["report", str(a), str(tmp_path / "empty"), "--out", str(tmp_path / "x.md")]) == 2
    assert "no results.json" in capsys.readouterr().err and not (tmp_path / "x.md").exists()
