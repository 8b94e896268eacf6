"""config.json -> the CompressAI-layout model, and its agreement with from_state_dict."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURE_NAMES, upstream_checkpoint
from lic_checkpoints.convert import api
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.verify.loading import load_converted, read_config
from lic_checkpoints.verify.models.compressai.installed import target_class


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_config_kwargs_and_from_state_dict_build_the_same_model(name, tmp_path):
    src = tmp_path / "ckpt.pth.tar"
    torch.save(upstream_checkpoint(name), src)
    result = api.convert_checkpoint(src, tmp_path / "out")
    model = load_converted(tmp_path / "out", update=False)
    config = read_config(tmp_path / "out")
    assert type(model) is target_class(config["family"])
    state = model.state_dict()
    inferred = type(model).from_state_dict(state)
    assert [(k, tuple(v.shape), v.dtype) for k, v in inferred.state_dict().items()] == [
        (k, tuple(v.shape), v.dtype) for k, v in state.items()
    ]
    assert all(torch.equal(inferred.state_dict()[k], v) for k, v in state.items())
    assert result.config["target"]["kwargs"] == config["target"]["kwargs"]


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(LicError, match="config.json: missing"):
        load_converted(tmp_path)
