"""The T2 decision comparison on hand-made decisions: explained flips, real divergences, knock-on."""

from __future__ import annotations

import torch

from lic_checkpoints.verify.tiers import CodedSide, Tolerances, index_margin, rounding_margin, tier2

TABLE = torch.tensor([0.11, 0.2, 0.4, 0.8])
K, C, H = 2, 4, 3  # 2 slices of 2 channels


class _Image:
    name = "img"


def _side(values: torch.Tensor, scales: torch.Tensor, forced=None) -> CodedSide:
    idx = torch.bucketize(scales, TABLE[:-1], right=False).int()
    x = torch.zeros(1, 3, 8, 8)
    return CodedSide(
        symbols_y=torch.round(values).int(), indexes_y=idx, symbols_z=torch.zeros(1, 2, 1, 1, dtype=torch.int32),
        y_minus_means=values, scales=scales, z_minus_medians=torch.zeros(1, 2, 1, 1), decoded=x, forward_x_hat=x,
        nbytes=100, streams=2, in_reference_context=forced,
    )


def _forced(values, scales):
    side = _side(values, scales)
    return {"symbols": side.symbols_y, "indexes": side.indexes_y, "y_minus_means": values, "scales": scales}


def _values():
    torch.manual_seed(0)
    values = torch.randn(1, C, H, H) * 3
    values = torch.where((values - values.floor() - 0.5).abs() < 0.1, values + 0.2, values)  # no near-ties
    scales = torch.full((1, C, H, H), 0.3)
    return values, scales


def _slice_checks(result):
    return [c for c in result.checks if "slice" in c.name]


def test_identical_decisions_pass():
    values, scales = _values()
    ref = _side(values, scales)
    tgt = _side(values, scales, forced=_forced(values, scales))
    result = tier2([_Image()], [ref], [tgt], K, TABLE, Tolerances())
    assert result.passed
    assert all("equal" in c.detail for c in _slice_checks(result))


def test_flip_at_a_boundary_is_explained_and_later_slices_are_still_compared():
    values, scales = _values()
    values[0, 0, 0, 0] = 1.5 - 2e-6  # the reference rounds down to 1 ...
    target_values = values.clone()
    target_values[0, 0, 0, 0] = 1.5 + 2e-6  # ... the target, off by float noise, rounds up to 2
    ref = _side(values, scales)
    tgt = _side(target_values, scales, forced=_forced(target_values, scales))
    result = tier2([_Image()], [ref], [tgt], K, TABLE, Tolerances())
    assert result.passed
    first, second = _slice_checks(result)
    assert first.explained and "1 rounding" in first.detail and "float noise" in first.detail
    assert second.passed and not second.explained and "equal" in second.detail  # compared on its own


def test_flip_far_from_a_boundary_fails():
    values, scales = _values()
    target_values = values.clone()
    target_values[0, 2, 1, 1] += 1.0  # a whole step: no float noise explains that
    ref = _side(values, scales)
    tgt = _side(target_values, scales, forced=_forced(target_values, scales))
    result = tier2([_Image()], [ref], [tgt], K, TABLE, Tolerances())
    assert not result.passed
    failing = result.first_failure()
    assert failing.name.endswith("slice 1 symbols and scale indexes") and "a real divergence" in failing.detail


def test_scale_index_flip_is_judged_by_its_distance_to_the_table():
    values, scales = _values()
    target_scales = scales.clone()
    scales[0, 1, 2, 2] = 0.4 - 1e-6
    target_scales[0, 1, 2, 2] = 0.4 + 1e-6
    ref = _side(values, scales)
    tgt = _side(values, target_scales, forced=_forced(values, target_scales))
    assert bool((ref.indexes_y != tgt.in_reference_context["indexes"]).any())
    result = tier2([_Image()], [ref], [tgt], K, TABLE, Tolerances())
    assert result.passed and _slice_checks(result)[0].explained


def test_without_reference_context_later_slices_are_knock_on():
    values, scales = _values()
    values[0, 0, 0, 0] = 2.5 - 1e-6
    target_values = values.clone()
    target_values[0, 0, 0, 0] = 2.5 + 1e-6
    target_values[0, 3] += 1.0  # slice 1 differs wholesale, as a knock-on of slice 0's flip would
    result = tier2([_Image()], [_side(values, scales)], [_side(target_values, scales)], K, TABLE, Tolerances())
    assert result.passed
    assert "not compared" in _slice_checks(result)[1].detail


def test_margins():
    assert torch.allclose(rounding_margin(torch.tensor([0.5, 1.0, 1.49])), torch.tensor([0.0, 0.5, 0.01]), atol=1e-6)
    assert abs(float(index_margin(torch.tensor([0.41]), TABLE)) - 0.01) < 1e-6
