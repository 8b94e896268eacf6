"""TCM+AuxT (qingshi9974/AuxT): what only this family does, beyond the conformance suite.

AuxT adds wavelet branches (Haar DWT/IDWT plus an orthogonal projection) to TCM's transforms.
Upstream builds its Haar kernels as 2-D float32 buffers from PyWavelets (0.49999997, not 0.5);
CompressAI master's wrapper layout uses separable filters (1/sqrt(2) in float32) and merges the
branches after g_a layers 0/3/6/9 and g_s layers 2/5/8/9.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGURATIONS, fixture_input, fixture_manifest, meta_state_dict, target_manifest
from lic_checkpoints.verify.models.blocks.wavelets import HaarDWT, HaarIDWT
from lic_checkpoints.verify.models.compressai.compat import IncompatibleStateDictError
from lic_checkpoints.verify.models.compressai.tcm import TCM
from lic_checkpoints.verify.models.compressai.tcm_blocks import WLS, iWLS

AUXT = [c for c in CONFIGURATIONS if c.family.family == "tcm_auxt"]
ids = [c.name for c in AUXT]


@pytest.mark.parametrize("conf", AUXT, ids=ids)
def test_branches_merge_where_master_merges_them(conf):
    model = TCM(**conf.target_kwargs)
    assert model.use_auxt
    merges = {"g_a": list(model.g_a.merge_positions), "g_s": list(model.g_s.merge_positions)}
    assert merges == target_manifest(conf.name)["auxt_merge_positions"]


@pytest.mark.parametrize("conf", AUXT, ids=ids)
def test_upstream_haar_kernels_are_pywavelets_float32_values(conf):
    """0.49999997 (float32 of PyWavelets' 0.7071067811865476 squared), not 0.5; ours equal the fixture's."""
    quarter = torch.tensor(0.4999999701976776, dtype=torch.float32)
    assert quarter.item() != 0.5
    ours = HaarDWT()
    for band in ("ll", "lh", "hl", "hh"):
        taps = getattr(ours, f"w_{band}")
        assert taps.dtype == torch.float32
        assert torch.equal(taps.abs(), quarter.expand_as(taps)), band
    _, constants = fixture_manifest(conf.name)
    stored = [k for k in constants if k.endswith(".dwt.w_ll")]
    assert stored
    for key in stored:
        prefix = key[: -len("w_ll")]
        for band in ("ll", "lh", "hl", "hh"):
            assert torch.equal(constants[prefix + f"w_{band}"], getattr(ours, f"w_{band}")), prefix + band


def test_separable_haar_equals_upstream_2d_kernels_up_to_rounding():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, 24)
    ours, theirs = WLS(5, 4).dwt(x), HaarDWT()(x)
    dwt_diff = (ours - theirs).abs().max().item()
    inv_ours, inv_theirs = iWLS(4, 5).idwt(theirs), HaarIDWT()(theirs)
    idwt_diff = (inv_ours - inv_theirs).abs().max().item()
    print(f"\nseparable vs 2-D Haar max|diff|: DWT {dwt_diff:.2e}, IDWT {idwt_diff:.2e} (inputs ~N(0,1))")
    # a few float32 ulps of values of order 1; not bit-exact (1-D taps 0.70710677 vs 2-D taps 0.49999997)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    assert torch.allclose(inv_ours, inv_theirs, rtol=0, atol=1e-6)
    assert torch.allclose(iWLS(4, 5).idwt(ours), x, rtol=0, atol=1e-6)


@pytest.mark.parametrize("conf", AUXT, ids=ids)
def test_haar_wavelet_pair_reconstructs(conf):
    x = fixture_input(conf.name)[:, :, :64, :96]
    bands = HaarDWT()(x)
    assert bands.shape == (1, 12, 32, 48)
    # LL of a constant image is 2x the value (orthonormal Haar), the detail bands vanish
    flat = HaarDWT()(torch.ones(1, 1, 4, 4))
    assert torch.allclose(flat[:, 0], torch.full((1, 2, 2), 2.0), atol=1e-6)
    assert flat[:, 1:].abs().max() < 1e-6
    assert (HaarIDWT()(bands) - x).abs().max() < 1e-6


@pytest.mark.parametrize("conf", AUXT, ids=ids)
def test_plain_tcm_layout_is_refused_naming_the_difference(conf):
    plain = next(c for c in CONFIGURATIONS if c.family.family == "tcm" and c.target_kwargs.get("N") == conf.target_kwargs["N"])
    model = TCM(**conf.target_kwargs)
    with pytest.raises(IncompatibleStateDictError, match=r"missing keys \(g_a\.transform\..*it looks like TCM, not TCM\+AuxT$"):
        model.load_state_dict(meta_state_dict(target_manifest(plain.name)["state_dict"]))
