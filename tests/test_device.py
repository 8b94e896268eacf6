"""Coding off the CPU: each model's analysis and synthesis run on the device, the rest on the CPU.

This machine may have no GPU, so the path is held to account in two ways that need none:

- the meta device stands in for the GPU: every configuration's transforms, both sides, run there
  with copies of their weights, which fails for any tensor a transform keeps or makes on the CPU
  (a test shows it does);
- the whole verification runs the split path with the CPU standing in for the device, and must give
  exactly the report of an ordinary run.

Where CUDA exists, ``tests/test_release.py::test_forward_on_cuda_passes_and_is_recorded`` runs it there.
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import CONFIGURATION_NAMES
from lic_checkpoints.verify import api as verify_api
from lic_checkpoints.verify import device as device_mod
from lic_checkpoints.verify.api import verify_checkpoint
from lic_checkpoints.verify.reuse import TransformReuse, entry_points

META = torch.device("meta")


class _Scale(torch.nn.Module):
    def __init__(self, value: float, cpu_constant: bool = False) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3, 1, 1), value))
        self.cpu_constant = cpu_constant
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = x * self.weight
        return y + torch.ones(y.shape[-1]) if self.cpu_constant else y  # a tensor made on the CPU


class _Toy(torch.nn.Module):
    def __init__(self, cpu_constant: bool = False) -> None:
        super().__init__()
        self.g_a, self.g_s = _Scale(2.0, cpu_constant), _Scale(0.5)
        self.h = _Scale(3.0)

    def forward(self, x):
        return self.g_s(self.h(self.g_a(x)))


def test_a_transform_runs_on_the_device_with_copies_of_its_weights():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    call = device_mod.on_device(model.g_a, type(model.g_a).forward.__get__(model.g_a), META, back=META)
    y = call(x)
    assert y.device == META and y.shape == x.shape
    assert model.g_a.weight.device.type == "cpu" and model.g_a.calls == 1, "the module ran, its weights stayed"


def test_weights_shared_by_two_layers_stay_shared_on_the_device():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    model.g_a.twin = _Scale(1.0)
    model.g_a.twin.weight = model.g_a.weight  # tied: one tensor under two names
    call = device_mod.on_device(model.g_a, type(model.g_a).forward.__get__(model.g_a), META, back=META)
    assert call(x).device == META  # functional_call refuses two different copies of a tied weight


def test_the_meta_run_catches_a_tensor_a_transform_makes_on_the_cpu():
    model = _Toy(cpu_constant=True)
    call = device_mod.on_device(model.g_a, type(model.g_a).forward.__get__(model.g_a), META, back=META)
    with pytest.raises((RuntimeError, NotImplementedError), match="device"):
        call(torch.rand(1, 3, 4, 4, device=META))


def test_transforms_elsewhere_compose_with_reuse_and_leave_nothing_behind():
    model, x = _Toy(), torch.rand(1, 3, 4, 4)
    expected = model(x)
    memo = TransformReuse(model)
    with device_mod.transforms_on(torch.device("cpu"), model):
        assert model.g_a.__dict__["forward"].device.type == "cpu"  # the device call is in place
        with memo.recording(0):
            recorded = model(x)
        with memo.replaying(0):
            replayed = model(x)
        assert "forward" in model.g_a.__dict__, "reuse put the device call back"
    assert torch.equal(recorded, expected) and torch.equal(replayed, expected)
    assert memo.reused == 2 and memo.computed == 0
    assert "forward" not in model.g_a.__dict__ and "forward" not in model.g_s.__dict__


@pytest.mark.parametrize("name", CONFIGURATION_NAMES)
def test_every_configuration_s_transforms_run_on_another_device(name, checkpoints, monkeypatch):
    built = {}
    monkeypatch.setattr(verify_api, "_run_model_tiers",
                        lambda report, wanted, reference, target, *a, **k: built.update(reference=reference, target=target))
    verify_checkpoint(checkpoints.path(name), tiers=["T1"])
    for side, model in built.items():
        calls = {transform: device_mod.on_device(owner, getattr(type(owner), attribute).__get__(owner), META, back=META)
                 for transform, owner, attribute in entry_points(model)}
        assert set(calls) == {"analysis", "synthesis"}, side
        with torch.no_grad():
            y = calls["analysis"](torch.rand(1, 3, 256, 256, device=META))
            y = y[0] if isinstance(y, (tuple, list)) else y
            x_hat = calls["synthesis"](torch.zeros(y.shape, device=META))
            x_hat = x_hat[0] if isinstance(x_hat, (tuple, list)) else x_hat
        assert y.device == META and y.shape[-2:] == (16, 16), (side, y.shape)
        assert x_hat.device == META and tuple(x_hat.shape) == (1, 3, 256, 256), (side, x_hat.shape)
        assert all(p.device.type == "cpu" for p in model.parameters()), "the model's own weights stay"


def test_coding_with_the_transforms_on_a_device_gives_the_same_report(checkpoints, one_image, monkeypatch):
    src = checkpoints.path(CONFIGURATION_NAMES[0])
    options = dict(images=one_image, tiers=["T1", "T2", "T3"])
    plain = verify_checkpoint(src, **options)
    assert plain.passed, plain.first_failure()
    calls = []
    on_device = device_mod.on_device

    def counted(owner, function, device, **kwargs):
        call = on_device(owner, function, device, **kwargs)

        def run(*args, **kw):
            calls.append(type(owner).__name__)
            return call(*args, **kw)

        run.device = device
        return run

    # the CPU stands in for the device: the split path runs whole, with the CPU's arithmetic
    monkeypatch.setattr(device_mod, "off_cpu", lambda device: True)
    monkeypatch.setattr(device_mod, "on_device", counted)
    split = verify_checkpoint(src, **options)
    assert split.passed, split.first_failure()
    assert len(calls) == 4, calls  # each side's forward: analysis and synthesis; coding reused them all
    assert any(n.startswith("coding reused the forward's analysis/synthesis results for 4 of 4") for n in split.notes)
    assert json.dumps(split.to_dict()["tiers"], sort_keys=True) == json.dumps(plain.to_dict()["tiers"], sort_keys=True)
    assert split.to_dict()["eval_model"] == plain.to_dict()["eval_model"]
    assert split.runtime["coding_transforms_device"] == "cpu"
