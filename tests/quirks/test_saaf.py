"""SAAF (huidong-ma/SAAF): what only this family does, beyond the conformance suite.

SAAF is DCAE's entropy model (``test_dcae.py`` covers that part) with sparse window attention onto
learned global tokens, frequency branches and a training-only diffusion prior.  Upstream computes
the global-token attention logits with the *unscaled* query (its SDPA path never scales q), while
CompressAI master scales it; we follow upstream.
"""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGURATIONS, fixture_manifest
from lic_checkpoints.verify.models.blocks.saaf_blocks import CrossSparseWindowAttention
from lic_checkpoints.verify.models.compressai.saaf import SAAF

SAAF_CONFIGURATIONS = [c for c in CONFIGURATIONS if c.family.family == "saaf"]
ids = [c.name for c in SAAF_CONFIGURATIONS]

SMALL = dict(N=64, M=96, hyper_channels=48, num_slices=3, max_support_slices=1, feature_dims=(32, 48, 64),
             block_num=(1, 1, 2), head_dim=(8, 16, 16, 32, 16, 8), dict_num=16, dict_head_num=4,
             window_size=4, hyper_window_size=2, hyper_head_dim=16)


@pytest.mark.parametrize("conf", SAAF_CONFIGURATIONS, ids=ids)
def test_no_relative_position_params_upstream(conf):
    """SAAF's attention has timm-style tables already: the DCAE rule for ``relative_position_params`` has nothing to do."""
    manifest, _ = fixture_manifest(conf.name)
    assert not [row[0] for row in manifest["state_dict"] if row[0].endswith(".msa.relative_position_params")]
    assert [row[0] for row in manifest["state_dict"] if row[0].endswith(".msa.global_tokens")]


def test_global_token_logits_use_the_unscaled_query():
    """With ``global_alpha = 1`` the block's output is the global branch alone: it equals the branch
    computed with softmax(q k^T) and differs from the one with master's softmax(q k^T / sqrt(d))."""
    torch.manual_seed(0)
    width, window = 16, 2
    block = CrossSparseWindowAttention(width, width, head_dim=width, window_size=window).eval()  # one head
    with torch.no_grad():
        block.global_alpha.fill_(1.0)
        block.global_tokens.normal_()
    x = torch.randn(1, window, window, width) * 3
    with torch.no_grad():
        out = block(x).reshape(window * window, width)
        tokens = x.reshape(window * window, width)  # one window, row-major
        q = block.embedding_layer(tokens)[:, :width]
        anchors = block.global_tokens[0] + tokens.mean(dim=0, keepdim=True)
        keys, values = block.global_kv(anchors).split(width, dim=-1)

        def branch(scale: float) -> torch.Tensor:
            return block.linear(((q @ keys.T) * scale).softmax(dim=-1) @ values)

        unscaled, scaled = branch(1.0), branch(width ** -0.5)
    assert torch.allclose(out, unscaled, rtol=1e-5, atol=1e-5), (out - unscaled).abs().max()
    assert not torch.allclose(out, scaled, rtol=1e-3, atol=1e-3)


def test_from_state_dict_infers_a_non_default_config():
    with torch.device("meta"):
        model = SAAF(**SMALL)
    assert SAAF.infer_kwargs(model.state_dict()) == model.config()
    assert model.config()["dictionary_dim"] == 32 * SMALL["dict_head_num"]


def test_small_saaf_round_trip_is_exact():
    """A non-default SAAF (so also the DCAE skeleton and the shared codec) codes losslessly, with
    slices seeing only one earlier slice."""
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = SAAF(**SMALL).eval()
    assert model.latent_codec.y.support_slices == [(), (0,), (0,)]
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = model(x)
        model.update()
        encoded = model.compress(x)
        decoded = model.decompress(encoded["strings"], encoded["shape"])["x_hat"]
    assert out["likelihoods"]["y"].shape == (1, 96, 8, 8) and out["likelihoods"]["z"].shape == (1, 48, 2, 2)
    assert len(encoded["strings"]) == 4
    assert torch.equal(decoded, out["x_hat"].clamp(0, 1))
    assert out["diffusion_loss"].item() == 0.0  # eval
    with torch.no_grad():
        trained = model.train()(x)["diffusion_loss"]  # the denoising prior only runs in training
    assert trained.dim() == 0 and torch.isfinite(trained) and trained.item() > 0.0
