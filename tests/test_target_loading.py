"""config.json -> the CompressAI-layout model, and its agreement with from_state_dict."""

from __future__ import annotations

import pytest
import torch

from conftest import FIXTURE_NAMES, upstream_checkpoint
from lic_checkpoints.convert import api
from lic_checkpoints.convert.errors import LicError
from lic_checkpoints.verify.loading import load_converted, read_config
from lic_checkpoints.verify.models.compressai.installed import target_class


def _build(cls, kwargs):
    try:
        with torch.device("meta"):  # cheap where the model allows it
            return cls(**kwargs)
    except (NotImplementedError, RuntimeError):  # compressai's GDN (TCM) needs real tensors
        return cls(**kwargs)


def _layout(model):
    return [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_config_kwargs_and_inferred_kwargs_build_the_same_model(name, tmp_path):
    """The kwargs lic-convert records and the ones from_state_dict infers give the same layout."""
    src = tmp_path / "ckpt.pth.tar"
    torch.save(upstream_checkpoint(name), src)
    state, result = api.convert_in_memory(src)
    cls = target_class(result.family)
    from_config, inferred = _build(cls, result.config["target"]["kwargs"]), _build(cls, cls.infer_kwargs(state))
    assert _layout(from_config) == _layout(inferred)
    assert [k for k, _, _ in _layout(from_config)] == list(state)


def test_load_converted_folder(tmp_path):
    src = tmp_path / "ckpt.pth.tar"
    torch.save(upstream_checkpoint("tcm_n64"), src)
    api.convert_checkpoint(src, tmp_path / "out")
    model = load_converted(tmp_path / "out")
    assert type(model) is target_class(read_config(tmp_path / "out")["family"])
    assert not model.training
    table = model.latent_codec.y.latent_codec["y0"].gaussian_conditional._quantized_cdf
    assert table.numel() > 0  # update(force=True) ran


def test_missing_config_is_a_clear_error(tmp_path):
    with pytest.raises(LicError, match="config.json: missing"):
        load_converted(tmp_path)
