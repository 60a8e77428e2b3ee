"""The regularizers study's default rule (SPEC section 7, as written) on made-up cells: the variants
against the paper's regularizers form one Holm family, and a difference counts only where it survives it;
a variant qualifies where the paper's loses beyond noise somewhere and the variant nowhere, or where a
strictly cheaper variant is equivalent everywhere. Also the late loss of a cell with a failed seed."""

from __future__ import annotations

from neumann_repro.studies import regularizers as reg


def _row(mean: float, spread: float = 0.05) -> dict:
    return dict(report=[mean - spread, mean, mean + spread, mean + spread / 2], test_mean=mean, late_loss=0.0)


def _rows(cells: dict[str, tuple[float, float]], new: str = "new") -> dict:
    return {name: {"paper": _row(paper), new: _row(value)} for name, (paper, value) in cells.items()}


def test_a_variant_better_at_1024_and_equivalent_elsewhere_qualifies():
    rows = _rows({"mlp/128": (5.0, 5.0), "mlp/1024": (8.0, 6.0)})
    ok, why = reg.qualifies(rows, "new")
    assert ok and not why


def test_worse_anywhere_or_better_nowhere_does_not_qualify():
    ok, why = reg.qualifies(_rows({"mlp/128": (5.0, 6.0), "mlp/1024": (8.0, 6.0)}), "new")
    assert not ok and why and why == [w for w in why if w.startswith("worse in mlp/128 (+1.00 (95%: ")]
    ok, why = reg.qualifies(_rows({"mlp/128": (5.0, 5.0), "mlp/1024": (8.0, 8.0)}), "new")
    assert not ok and why == ["better in no cell"]


def test_better_in_one_cell_and_equivalent_elsewhere_qualifies_wherever_that_cell_is():
    ok, why = reg.qualifies(_rows({"mlp/128": (6.0, 5.0), "mlp/1024": (8.0, 8.0)}), "new")
    assert ok and not why


def test_only_a_cheaper_variant_qualifies_by_equivalence_alone():
    same = {"mlp/128": (5.0, 5.0), "mlp/1024": (8.0, 8.0)}
    assert reg.qualifies(_rows(same, "no-regularizers"), "no-regularizers") == (True, [])
    assert not reg.qualifies(_rows(same, "no-repulsive"), "no-repulsive")[0]
    rows = _rows({"mlp/128": (5.0, 5.0), "mlp/1024": (8.0, 8.0)}, "no-regularizers")
    rows["mlp/1024"]["no-regularizers"] = _row(8.0, 0.6)  # not shown equivalent there: no longer qualifies
    ok, why = reg.qualifies(rows, "no-regularizers")
    assert not ok and why == ["better in no cell, and not equivalent in every cell"]


def test_the_family_is_every_variant_in_every_cell():
    """A difference whose own p passes 5% but not once Holm-adjusted over the family does not count."""
    rows = _rows({f"mlp/{b}": (5.0, 5.0) for b in (64, 128, 256, 512)})
    rows["mlp/1024"] = {"paper": _row(8.0, 0.6), "new": _row(7.0, 0.6)}
    c = reg._contrasts(rows)[("mlp/1024", "new")]
    assert len(reg._contrasts(rows)) == 5 and c["p"] < 0.05 < c["p_holm"]
    assert not reg.qualifies(rows, "new")[0]


def _run(seed: int, curve: list[float], lr: float = 1.0) -> dict:
    hist = [dict(epoch=i + 1, test_error=e, val_error=e) for i, e in enumerate(curve)]
    return dict(config=dict(lr=lr, seed=seed, epochs=len(curve)), diverged=False, history=hist, steps=len(curve))


def test_a_seed_that_collapses_early_counts_in_the_final_error_but_not_in_the_late_loss():
    """Tuning seeds 0, 1 at lr 1 (lr 0.5 and 2 worse); reporting seeds 2-5, seed 4 stuck at chance from
    epoch 2. The late loss is the other three's final minus their best (mean curve); the final error counts
    all four; the tuning seeds enter neither."""
    protocol = reg.Protocol(**reg.FULL_PROTOCOL, final_seeds=6)
    good = [20.0, 6.0, 5.0, 5.5]  # best 5.0, final 5.5: a late loss of 0.5
    runs = [_run(s, [30.0, 20.0, 15.0, 15.0], lr) for lr in (0.5, 2.0) for s in (0, 1)]
    runs += [_run(s, [20.0, 4.0, 3.0, 9.0]) for s in (0, 1)]  # tuning seeds: they must not count
    runs += [_run(s, good) for s in (2, 3, 5)] + [_run(4, [20.0, 90.0, 90.0, 90.0])]
    row = reg.cell_summary(runs, protocol)
    assert row["lr"] == 1.0 and row["failed"] == 1 and row["seeds"] == 4
    assert row["test_mean"] == (3 * 5.5 + 90.0) / 4
    assert row["best"] == 5.0 and row["late_loss"] == 0.5
    assert reg.failed_note(row) == " (1 of 4 seeds failed: left out)"
