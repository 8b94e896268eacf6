"""STF and WACNN (Googolxx/STF): the upstream details the conformance suite does not isolate.

Both families come from one repository, which bundles its own compressai 1.1.6dev0; the
conformance suite already proves both models bit-exact against the golden data. The checks here
pin each upstream detail down on its own, on small inputs:

* the entropy bottleneck's compressai 1.1 likelihood ("sign trick") and its interleaved parameter
  order, loadable from the legacy ``_matrix{i}`` names;
* each slice is predicted from the *first* ``min(k, max_support)`` decoded slices;
* LRP sees the *mean* support;
* WACNN's "noShift" window attention does shift;
* inputs need sides that are multiples of 64 (not 128 as the other families).
"""

from __future__ import annotations

import pytest
import torch
from compressai.entropy_models import EntropyBottleneck
from compressai.models import CompressionModel

from conftest import CONFIGURATIONS
from lic_checkpoints.convert import registry
from lic_checkpoints.verify.builders import parameters_on_meta
from lic_checkpoints.verify.models.blocks.legacy_bottleneck import (
    InterleavedEntropyBottleneck,
    SignTrickEntropyBottleneck,
)
from lic_checkpoints.verify.models.blocks.stf_blocks import WindowAttentionModule, WindowAttentionUnit
from lic_checkpoints.verify.models.blocks.swin_windows import shift_mask
from lic_checkpoints.verify.models.compressai import stf as target
from lic_checkpoints.verify.models.upstream import stf as upstream

FAMILIES = ("stf", "wacnn")
STF_CONFIGURATIONS = [c for c in CONFIGURATIONS if c.family.family in FAMILIES]
ids = [c.name for c in STF_CONFIGURATIONS]


def _randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights at the golden fixtures' scales (0.5 / sqrt(fan-in) for matrices, 0.2 for
    vectors); the bottleneck's quantiles keep their built values."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith("quantiles"):
                continue
            scale = 0.5 / parameter[0].numel() ** 0.5 if parameter.dim() >= 2 else 0.2
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def _built(cls):
    """A model with its large parameters on the meta device (cheap; for structure checks only)."""
    with parameters_on_meta():
        return cls()


# --------------------------------------------------------------------------- entropy bottleneck


def test_bottleneck_likelihood_is_the_sign_trick():
    """|sigmoid(s*upper) - sigmoid(s*lower)| with s = -sign(lower + upper), in forward and in update()."""
    ours = _randomised(SignTrickEntropyBottleneck(8)).eval()
    plain = EntropyBottleneck(8).eval()
    plain.load_state_dict(ours.state_dict())
    z = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(1)) * 4
    with torch.no_grad():
        _, got = ours(z)
        _, theirs = plain(z)
        values = torch.round(z.transpose(0, 1).reshape(8, 1, -1) - ours._get_medians()) + ours._get_medians()
        lower = ours._logits_cumulative(values - 0.5, stop_gradient=True)
        upper = ours._logits_cumulative(values + 0.5, stop_gradient=True)
        sign = -torch.sign(lower + upper)
        manual = torch.abs(torch.sigmoid(sign * upper) - torch.sigmoid(sign * lower)).clamp_min(1e-9)
    assert torch.equal(got, manual.reshape(8, 2, 6, 6).transpose(0, 1))
    # the same probabilities, not the same floats (compressai >= 1.2 differs in the last bits)
    assert torch.allclose(got, theirs, rtol=0, atol=1e-6)
    assert not torch.equal(got, theirs)
    ours.update(force=True)
    plain.update(force=True)
    assert ours._quantized_cdf.shape == plain._quantized_cdf.shape


def test_reference_bottleneck_lists_parameters_as_compressai_1_1_and_loads_legacy_names():
    eb = InterleavedEntropyBottleneck(4)
    names = [n for n, _ in eb.named_parameters()]
    assert names == ["matrices.0", "biases.0", "factors.0", "matrices.1", "biases.1", "factors.1",
                     "matrices.2", "biases.2", "factors.2", "matrices.3", "biases.3", "factors.3",
                     "matrices.4", "biases.4", "quantiles"]
    assert list(eb.state_dict())[:len(names)] == names
    # the same computation as compressai's own layout of the same parameters
    same = SignTrickEntropyBottleneck(4)
    _randomised(same)
    eb.load_state_dict(same.state_dict())
    values = torch.randn(4, 1, 10, generator=torch.Generator().manual_seed(2))
    assert torch.equal(eb._logits_cumulative(values, True), same._logits_cumulative(values, True))
    # a model holding it loads the legacy names of real STF checkpoints (compressai maps them)
    class Holder(CompressionModel):
        def __init__(self) -> None:
            super().__init__()
            self.entropy_bottleneck = InterleavedEntropyBottleneck(4)

    legacy = {}
    for key, value in same.state_dict().items():
        kind, _, index = key.partition(".")
        spelled = {"matrices": "_matrix", "biases": "_bias", "factors": "_factor"}.get(kind)
        legacy["entropy_bottleneck." + (f"{spelled}{index}" if spelled else key)] = value
    assert "entropy_bottleneck._matrix0" in legacy
    holder = Holder()
    result = holder.load_state_dict(legacy)
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in same.state_dict().items():
        assert torch.equal(holder.state_dict()[f"entropy_bottleneck.{key}"], value), key


# --------------------------------------------------------------------------- the slice loop


@pytest.mark.parametrize("conf", STF_CONFIGURATIONS, ids=ids)
def test_each_slice_sees_the_first_decoded_slices(conf):
    """Slice k is predicted from slices 0 .. min(k, max_support) - 1, not from the most recent ones."""
    model = _built(registry.import_class(conf.family.target["ours"]))
    support = model.max_support_slices
    assert support == model.num_slices // 2  # 6 of 12 (STF), 5 of 10 (WACNN)
    expected = [tuple(range(min(k, support))) for k in range(model.num_slices)]
    assert model.latent_codec.y.support_slices == expected
    reference = _built(registry.import_class(conf.family.upstream["ours"]))
    decoded = [torch.full((1,), float(i)) for i in range(model.num_slices - 1)]
    assert [float(t) for t in reference._visible_support(decoded)] == list(range(support))


def test_lrp_sees_the_mean_support():
    """The context head hands LRP ``cat(latent_means, *support)``, the tensor upstream feeds to LRP."""
    head = _randomised(target.SupportContextHead(latent_channels=8, support_channels=4, slice_channels=4))
    x = torch.randn(1, 8 + 8 + 4, 5, 5, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = head(x)
        scales, means, mean_support = out[:, :4], out[:, 4:8], out[:, 8:]
        assert torch.equal(mean_support, torch.cat([x[:, :8], x[:, 16:]], dim=1))
        assert torch.equal(means, head.mean_cc(torch.cat([x[:, :8], x[:, 16:]], dim=1)))
        assert torch.equal(scales, head.scale_cc(x[:, 8:]))


# --------------------------------------------------------------------------- WACNN's window attention


def test_wacnn_no_shift_attention_shifts():
    """Upstream's ``Win_noShift_Attention`` gets shift 4 (window 8, N channels) and 2 (window 4, M
    channels) and uses them, on both sides."""
    for cls in (upstream.WACNN, target.WACNN):
        model = _built(cls)
        units = [m for m in model.modules() if isinstance(m, WindowAttentionUnit)]
        assert [(u.window_size, u.shift_size) for u in units] == [(8, 4), (4, 2), (4, 2), (8, 4)]
    shifted = _randomised(WindowAttentionModule(16, 2, window_size=4, shift_size=2)).eval()
    unshifted = WindowAttentionModule(16, 2, window_size=4, shift_size=0).eval()
    unshifted.load_state_dict(shifted.state_dict())
    x = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert not torch.allclose(shifted(x), unshifted(x))


def test_shifted_window_mask_blocks_pixels_from_opposite_borders():
    mask = shift_mask(8, 8, window_size=4, shift=2)
    assert mask.shape == (4, 16, 16) and set(mask.unique().tolist()) == {0.0, -100.0}
    assert torch.equal(mask[0], torch.zeros(16, 16))  # the top-left window holds one region
    # bottom-right window: four 2x2 regions; pixel 0 (row 0, col 0) may see pixels 0, 1, 4, 5 only
    allowed = (mask[3, 0] == 0).nonzero().flatten().tolist()
    assert allowed == [0, 1, 4, 5]


# --------------------------------------------------------------------------- input sizes


@pytest.mark.parametrize("conf", STF_CONFIGURATIONS, ids=ids)
def test_inputs_are_multiples_of_64(conf):
    assert (conf.input_multiple, conf.input_minimum) == (upstream.INPUT_MULTIPLE, upstream.INPUT_MINIMUM) == (64, 64)
    for side in (64, 128, 192, 320):
        upstream.check_input_size(torch.zeros(1, 3, side, 64))
    for side in (32, 96, 160, 200):
        with pytest.raises(ValueError, match="multiples of 64"):
            upstream.check_input_size(torch.zeros(1, 3, 64, side))


def test_small_inputs_run_on_both_sides_alike():
    """A 64x128 image (one window at 1/16) goes through WACNN's reference and target alike."""
    reference = _randomised(upstream.WACNN(N=32, M=320), seed=5).eval()
    ours = target.WACNN(N=32, M=320).eval()
    converted = {}
    for key, value in reference.state_dict().items():
        for prefix, to in (("h_a.", "latent_codec.h_a."), ("h_mean_s.", "latent_codec.h_s.h_mean_s."),
                           ("h_scale_s.", "latent_codec.h_s.h_scale_s."),
                           ("entropy_bottleneck.", "latent_codec.z.entropy_bottleneck.")):
            if key.startswith(prefix):
                converted[to + key[len(prefix):]] = value
        if key.startswith(("cc_mean_transforms.", "cc_scale_transforms.", "lrp_transforms.")):
            kind, k, rest = key.split(".", 2)
            leaf = {"cc_mean_transforms": f"channel_context.y{k}.mean_cc",
                    "cc_scale_transforms": f"channel_context.y{k}.scale_cc",
                    "lrp_transforms": f"latent_codec.y{k}.lrp_transform"}[kind]
            converted[f"latent_codec.y.{leaf}.{rest}"] = value
        if key.startswith(("g_a.", "g_s.")):
            converted[key.replace(".conv_b.0.attn.", ".conv_b.0.attn.attn.")] = value
        if key.startswith("gaussian_conditional."):
            for k in range(10):
                converted[f"latent_codec.y.latent_codec.y{k}.{key}"] = value.clone()
    ours.load_state_dict(converted)
    x = torch.rand(1, 3, 64, 128, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = reference(x), ours(x, return_params=True)
    assert torch.equal(a["x_hat"], b["x_hat"])
    assert torch.equal(a["likelihoods"]["z"], b["likelihoods"]["z"])
    assert torch.equal(a["likelihoods"]["y"], b["likelihoods"]["y"])
