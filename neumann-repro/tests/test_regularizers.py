"""The regularizers study's default rule (SPEC section 7) on made-up cells: the variants against the
paper's regularizers form one Holm family, and a difference counts only where it survives it."""

from __future__ import annotations

from neumann_repro.studies import regularizers as reg


def _row(mean: float, spread: float = 0.05) -> dict:
    return dict(report=[mean - spread, mean, mean + spread, mean + spread / 2], test_mean=mean, late_loss=0.0)


def _rows(cells: dict[str, tuple[float, float]]) -> dict:
    return {name: {"paper": _row(paper), "new": _row(new)} for name, (paper, new) in cells.items()}


def test_a_variant_better_at_1024_and_equivalent_elsewhere_qualifies():
    rows = _rows({"mlp/128": (5.0, 5.0), "mlp/1024": (8.0, 6.0)})
    ok, why = reg.qualifies(rows, "new")
    assert ok and not why


def test_worse_anywhere_or_not_better_at_1024_does_not_qualify():
    ok, why = reg.qualifies(_rows({"mlp/128": (5.0, 6.0), "mlp/1024": (8.0, 6.0)}), "new")
    assert not ok and why == [w for w in why if w.startswith("worse in mlp/128 (+1.00 (95%: ")]
    ok, why = reg.qualifies(_rows({"mlp/128": (5.0, 5.0), "mlp/1024": (8.0, 8.0)}), "new")
    assert not ok and why[0].startswith("not better in mlp/1024 (+0.00") and "equivalent within ±0.3" in why[0]


def test_the_family_is_every_variant_in_every_cell():
    """A difference whose own p passes 5% but not once Holm-adjusted over the family does not count."""
    rows = _rows({f"mlp/{b}": (5.0, 5.0) for b in (64, 128, 256, 512)})
    rows["mlp/1024"] = {"paper": _row(8.0, 0.6), "new": _row(7.0, 0.6)}
    c = reg._contrasts(rows)[("mlp/1024", "new")]
    assert len(reg._contrasts(rows)) == 5 and c["p"] < 0.05 < c["p_holm"]
    assert not reg.qualifies(rows, "new")[0]
