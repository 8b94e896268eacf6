"""The coding tiers reuse the forward's analysis/synthesis results only where that changes nothing.

``TransformReuse`` answers a transform call from the forward pass's record only when the input is the
recorded one bit for bit and neither recorded tensor was modified since; everything else runs the
module.  A verification with reuse must produce exactly the report it produces without.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGURATION_NAMES
from lic_checkpoints.verify import api as verify_api
from lic_checkpoints.verify import reuse
from lic_checkpoints.verify.api import verify_checkpoint


class _Counting(torch.nn.Module):
    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.calls = 0

    def forward(self, x, extra=None):
        self.calls += 1
        return x * self.scale if extra is None else x * self.scale + extra


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.g_a, self.g_s = _Counting(2.0), _Counting(0.75)

    def forward(self, x):
        return self.g_s(torch.round(self.g_a(x)))

    def code(self, x):
        return self.g_s(torch.round(self.g_a(x))).clamp_(0, 1)


def test_a_matching_call_is_answered_from_the_record_and_a_copy_is_returned():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    memo = reuse.TransformReuse(model)
    with memo.recording(0):
        forward = model(x)
    calls = (model.g_a.calls, model.g_s.calls)
    with memo.replaying(0):
        coded = model.code(x.clone())  # an equal tensor, not the same object
    assert (model.g_a.calls, model.g_s.calls) == calls, "nothing recomputed"
    assert memo.reused == 2 and memo.computed == 0
    assert torch.equal(coded, forward.clamp(0, 1))
    assert not torch.equal(forward, forward.clamp(0, 1)), "the in-place clamp did not reach the record"
    assert "forward" not in model.g_a.__dict__ and "forward" not in model.g_s.__dict__
    assert "analysis" not in model.__dict__


def test_a_different_input_another_image_or_extra_arguments_run_the_module():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    memo = reuse.TransformReuse(model)
    with memo.recording(0):
        model(x)
    with memo.replaying(0):
        nudged = x.clone()
        nudged.view(-1)[5] = torch.nextafter(nudged.view(-1)[5], torch.tensor(2.0))
        assert torch.equal(model.g_a(nudged), nudged * 2.0)
        assert torch.equal(model.g_a(x, extra=torch.ones(())), x * 2.0 + 1)
    with memo.replaying(1):
        model.g_a(x)
    assert memo.reused == 0 and memo.computed == 3


def test_a_record_changed_in_place_is_not_used():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    memo = reuse.TransformReuse(model)
    with memo.recording(0):
        y = model.g_a(x)
    y.add_(1.0)  # the recorded result no longer is what the module returned
    with memo.replaying(0):
        assert torch.equal(model.g_a(x), x * 2.0)
    assert memo.reused == 0 and memo.computed == 1


def test_records_go_when_an_image_is_done():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    memo = reuse.TransformReuse(model)
    with memo.recording(0):
        model(x)
    memo.forget(0)
    with memo.replaying(0):
        model.code(x)
    assert memo.reused == 0 and memo.computed == 2


class _NoReuse(reuse.TransformReuse):
    def replaying(self, image):
        return super().replaying(-1)  # no records for that image: every call runs the module


@pytest.mark.parametrize("name", CONFIGURATION_NAMES)
def test_reuse_changes_nothing_in_the_report(name, checkpoints, one_image, monkeypatch):
    src = checkpoints.path(name)
    options = dict(images=one_image, tiers=["T2", "T3"])
    with_reuse = verify_checkpoint(src, **options)
    assert with_reuse.passed, with_reuse.first_failure()
    note = next((n for n in with_reuse.notes if n.startswith("coding reused")), "")
    assert note.startswith("coding reused the forward's analysis/synthesis results for 4 of 4"), with_reuse.notes
    monkeypatch.setattr(verify_api, "TransformReuse", _NoReuse)
    without = verify_checkpoint(src, **options)
    assert not any(n.startswith("coding reused") for n in without.notes)
    assert json.dumps(with_reuse.to_dict()["tiers"], sort_keys=True) == json.dumps(without.to_dict()["tiers"], sort_keys=True)
    assert with_reuse.to_dict()["eval_model"] == without.to_dict()["eval_model"]
