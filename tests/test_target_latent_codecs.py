"""The master-layout entropy containers on toy modules, and the ours/installed class switch."""

from __future__ import annotations

import copy
import re
import sys
import types

import pytest
import torch
from compressai.entropy_models import GaussianConditional
from compressai.models import CompressionModel
from torch import Tensor, nn

from compressai.ans import BufferedRansEncoder
from conftest import CONFIGURATION_NAMES, fixture_expected, target_manifest
from lic_checkpoints.convert import registry
from lic_checkpoints.verify.models.compressai import installed
from lic_checkpoints.verify.models.compressai.latent_codecs import (
    LrpGaussianSliceCodec,
    SideContextSliceCodec,
    build_slice_hyperprior,
    leading_support,
)

M = 32  # latent channels
K = 4  # slices
SC = M // K  # channels per slice
HYPER = 16  # hyper-latent channels
MAX_SUPPORT = 2  # slice 3 sees slices 0 and 1 only
WIDTH = 12  # toy hidden width
HEAD_SUPPORT = 20  # channels of the toy heads' mean support


class ToyHead(nn.Module):
    """Context head shaped like the real ones: returns cat(scales, means, mean_support)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.support = nn.Conv2d(in_channels, HEAD_SUPPORT, 1)
        self.mean = nn.Conv2d(HEAD_SUPPORT, SC, 3, padding=1)
        self.scale = nn.Conv2d(in_channels, SC, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        support = self.support(x)
        return torch.cat([self.scale(x), self.mean(support), support], dim=1)


def toy_entropy_transform(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, WIDTH, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(WIDTH, WIDTH, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(WIDTH, out_channels, 3, padding=1),
    )


def toy_hyper_synthesis() -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(HYPER, WIDTH, 4, stride=2, padding=1),
        nn.GELU(),
        nn.ConvTranspose2d(WIDTH, M, 4, stride=2, padding=1),
    )


class ToyModel(CompressionModel):
    """A CompressionModel holding the container at ``latent_codec``, like master's models."""

    def __init__(self) -> None:
        super().__init__()
        support_counts = [len(s) for s in leading_support(K, MAX_SUPPORT)]
        self.latent_codec = build_slice_hyperprior(
            h_a=nn.Sequential(
                nn.Conv2d(M, WIDTH, 3, stride=2, padding=1),
                nn.GELU(),
                nn.Conv2d(WIDTH, HYPER, 3, stride=2, padding=1),
            ),
            h_mean_s=toy_hyper_synthesis(),
            h_scale_s=toy_hyper_synthesis(),
            hyper_channels=HYPER,
            context_heads=[ToyHead(2 * M + SC * s) for s in support_counts],
            lrp_transforms=[toy_entropy_transform(HEAD_SUPPORT + SC, SC) for _ in range(K)],
            mean_support_channels=[HEAD_SUPPORT] * K,
            slice_channels=[SC] * K,
            max_support_slices=MAX_SUPPORT,
        )


def make_model(seed: int = 0) -> ToyModel:
    torch.manual_seed(seed)
    model = ToyModel().eval()
    # Spread the bottleneck's medians so that z rounding is not centred on zero.
    with torch.no_grad():
        model.latent_codec.z.entropy_bottleneck.quantiles[:, 0, 1].uniform_(-0.4, 0.4)
    return model


def make_latent(batch: int, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 4.0 * torch.randn(batch, M, 16, 16, generator=generator)


@pytest.fixture(scope="module")
def model() -> ToyModel:
    torch.set_num_threads(2)
    return make_model()


@pytest.fixture(scope="module")
def updated_model() -> ToyModel:
    model = make_model()
    model.update(force=True)
    return model


def reference_forward(model: ToyModel, y: Tensor) -> dict[str, Tensor]:
    """The upstream slice loop spelled out by hand on the container's modules."""
    codec = model.latent_codec
    z = codec.h_a(y)
    bottleneck = codec.z.entropy_bottleneck
    _, z_likelihoods = bottleneck(z)
    medians = bottleneck.quantiles[:, :, 1:2]
    z_hat = torch.round(z - medians) + medians
    side = torch.cat([codec.h_s.h_mean_s(z_hat), codec.h_s.h_scale_s(z_hat)], dim=1)
    decoded, likelihoods, means, scales = [], [], [], []
    for k in range(K):
        y_k = y[:, k * SC : (k + 1) * SC]
        head_input = torch.cat([side, *decoded[: min(k, MAX_SUPPORT)]], dim=1)
        ctx = codec.y.channel_context[f"y{k}"](head_input)
        scale, mean, mean_support = ctx[:, :SC], ctx[:, SC : 2 * SC], ctx[:, 2 * SC :]
        leaf = codec.y.latent_codec[f"y{k}"]
        _, likelihood = leaf.gaussian_conditional(y_k, scale, mean)
        y_hat_k = torch.round(y_k - mean) + mean
        lrp = leaf.lrp_transform(torch.cat([mean_support, y_hat_k], dim=1))
        y_hat_k = y_hat_k + 0.5 * torch.tanh(lrp)
        decoded.append(y_hat_k)
        likelihoods.append(likelihood)
        means.append(mean)
        scales.append(scale)
    return {
        "y_hat": torch.cat(decoded, dim=1),
        "likelihoods_y": torch.cat(likelihoods, dim=1),
        "likelihoods_z": z_likelihoods,
        "means": torch.cat(means, dim=1),
        "scales": torch.cat(scales, dim=1),
        "z": z,
        "medians": medians,
    }


def gaussian_likelihood(y: Tensor, means: Tensor, scales: Tensor) -> Tensor:
    """Probability mass of the rounded residual under N(0, max(scale, 0.11)), floored at 1e-9."""
    residual = torch.round(y - means).abs().double()
    sigma = scales.double().clamp_min(0.11)
    normal = torch.distributions.Normal(0.0, 1.0)
    mass = normal.cdf((0.5 - residual) / sigma) - normal.cdf((-0.5 - residual) / sigma)
    return mass.clamp_min(1e-9)


# ----------------------------------------------------------------------------- layout


def structure(keys: list[str]) -> list[str]:
    """Key names reduced to master's container structure, family-specific inner names removed."""
    patterns = []
    for key in keys:
        key = re.sub(r"^(latent_codec\.h_a)\..*", r"\1.*", key)
        key = re.sub(r"^(latent_codec\.h_s\.h_(mean|scale)_s)\..*", r"\1.*", key)
        key = re.sub(r"^(latent_codec\.y\.channel_context\.y\d+)\..*", r"\1.*", key)
        key = re.sub(r"^(latent_codec\.y\.latent_codec\.y\d+\.lrp_transform)\..*", r"\1.*", key)
        if not patterns or patterns[-1] != key:
            patterns.append(key)
    return patterns


def _has_lrp_slice_leaves(name: str) -> bool:
    """Whether master's layout codes y as channel slices whose leaves carry an LRP transform: the
    container structure this module's toy model is built from (a checkerboard leaf is another one)."""
    return any(".latent_codec.y0.lrp_transform." in row[0] for row in target_manifest(name)["state_dict"])


@pytest.mark.parametrize("target_name", [n for n in CONFIGURATION_NAMES if _has_lrp_slice_leaves(n)])
def test_state_dict_keys_follow_master_layout(model, target_name):
    target = target_manifest(target_name)
    slice_index = re.compile(r"\.y(\d+)\.")

    def in_toy_range(key: str) -> bool:
        match = slice_index.search(key)
        return match is None or int(match.group(1)) < K

    target_keys = [
        key
        for key, *_ in target["state_dict"]
        if key.startswith("latent_codec.") and in_toy_range(key)
    ]
    ours = list(model.state_dict().keys())
    assert structure(ours) == structure(target_keys)
    # Entropy-model entries are not family specific: names and dtypes match master one for one.
    target_entropy = {
        key: dtype
        for key, _, dtype, _ in target["state_dict"]
        if ".gaussian_conditional." in key or ".entropy_bottleneck." in key
    }
    for key, value in model.state_dict().items():
        if ".gaussian_conditional." in key or ".entropy_bottleneck." in key:
            assert str(value.dtype).removeprefix("torch.") == target_entropy[key], key


def test_support_slices_and_head_inputs(model):
    assert model.latent_codec.y.support_slices == [(), (0,), (0, 1), (0, 1)]
    assert leading_support(5, -1) == [(), (0,), (0, 1), (0, 1, 2), (0, 1, 2, 3)]
    assert leading_support(5, 5) == leading_support(5, -1)
    with pytest.raises(ValueError, match="earlier slices"):
        SideContextSliceCodec(
            channel_context={"y0": nn.Identity(), "y1": nn.Identity()},
            latent_codec={f"y{k}": LrpGaussianSliceCodec(nn.Identity(), 1) for k in range(2)},
            groups=[1, 1],
            support_slices=[(), (1,)],
        )


# ----------------------------------------------------------------------------- forward


def test_forward_matches_reference_loop(model):
    y = make_latent(2)
    with torch.no_grad():
        out = model.latent_codec(y, return_params=True)
        ref = reference_forward(model, y)
    assert set(out) == {"likelihoods", "y_hat", "params"}
    assert torch.equal(out["y_hat"], ref["y_hat"])
    assert torch.equal(out["likelihoods"]["y"], ref["likelihoods_y"])
    assert torch.equal(out["likelihoods"]["z"], ref["likelihoods_z"])
    assert torch.equal(out["params"]["means"], ref["means"])
    assert torch.equal(out["params"]["scales"], ref["scales"])
    # The likelihoods are the Gaussian mass of the rounded residual (fixture tolerance).
    expected = gaussian_likelihood(y, ref["means"], ref["scales"]).float()
    assert torch.allclose(out["likelihoods"]["y"], expected, rtol=0, atol=1e-5)
    # The data exercises rounding: many non-zero residual symbols and non-trivial likelihoods.
    assert (torch.round(y - ref["means"]) != 0).float().mean() > 0.3
    assert 0.05 < out["likelihoods"]["y"].mean() < 0.95
    # Without return_params the result is master's dict.
    with torch.no_grad():
        assert set(model.latent_codec(y)) == {"likelihoods", "y_hat"}


def test_training_forward_rounds_with_straight_through_gradient(model):
    net = copy.deepcopy(model).train()
    y = make_latent(1).requires_grad_(True)
    out = net.latent_codec(y)
    with torch.no_grad():
        reference = reference_forward(model, y.detach())
    # Upstream rounds y and z (STE) in training too, so y_hat equals the eval y_hat ...
    assert torch.equal(out["y_hat"].detach(), reference["y_hat"])
    # ... while the likelihoods come from the noisy training proxy.
    assert not torch.equal(out["likelihoods"]["y"].detach(), reference["likelihoods_y"])
    out["y_hat"].sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- entropy coding


@pytest.mark.parametrize("name", CONFIGURATION_NAMES)
def test_update_fills_every_slice_table(updated_model, name):
    expected = fixture_expected(name)
    leaves = [updated_model.latent_codec.y.latent_codec[f"y{k}"] for k in range(K)]
    for leaf in leaves:
        gc = leaf.gaussian_conditional
        assert isinstance(gc, GaussianConditional)
        # The Gaussian tables depend only on the default scale table: upstream's exactly.
        for name in ("_quantized_cdf", "_offset", "_cdf_length", "scale_table"):
            assert torch.equal(getattr(gc, name), expected[f"gaussian_conditional.{name}"]), name
    bottleneck = updated_model.latent_codec.z.entropy_bottleneck
    assert bottleneck._offset.shape == (HYPER,) and bottleneck._quantized_cdf.shape[0] == HYPER
    fresh = make_model()
    assert all(
        fresh.latent_codec.y.latent_codec[f"y{k}"].gaussian_conditional._quantized_cdf.numel() == 0
        for k in range(K)
    )


@pytest.fixture(scope="module")
def coded(updated_model):
    y = make_latent(2, seed=3)
    with torch.no_grad():
        encoded = updated_model.latent_codec.compress(y, return_symbols=True)
        decoded = updated_model.latent_codec.decompress(encoded["strings"], encoded["shape"])
        forward = updated_model.latent_codec(y, return_params=True)
        reference = reference_forward(updated_model, y)
    return y, encoded, decoded, forward, reference


def test_strings_structure(coded):
    y, encoded, _, _, _ = coded
    strings = encoded["strings"]
    assert len(strings) == K + 1
    assert all(len(per_slice) == y.size(0) for per_slice in strings)
    assert all(isinstance(s, bytes) and len(s) > 0 for per_slice in strings for s in per_slice)
    assert tuple(encoded["shape"]["y"]) == tuple(y.shape[1:])
    assert tuple(encoded["shape"]["z"]) == (4, 4)


def test_round_trip_is_exact_and_equals_forward(coded):
    _, encoded, decoded, forward, _ = coded
    assert torch.equal(decoded["y_hat"], encoded["y_hat"])
    assert torch.equal(encoded["y_hat"], forward["y_hat"])


def test_symbols_and_indexes_are_what_was_coded(coded, updated_model):
    y, encoded, _, forward, reference = coded
    means, scales = forward["params"]["means"], forward["params"]["scales"]
    gc = updated_model.latent_codec.y.latent_codec["y0"].gaussian_conditional
    for k in range(K):
        part = slice(k * SC, (k + 1) * SC)
        symbols = encoded["symbols"]["y"][k]
        assert symbols.dtype == torch.int32
        assert torch.equal(symbols, torch.round(y[:, part] - means[:, part]).int())
        assert torch.equal(encoded["indexes"]["y"][k], gc.build_indexes(scales[:, part]))
    z_symbols = encoded["symbols"]["z"]
    assert torch.equal(z_symbols, torch.round(reference["z"] - reference["medians"]).int())
    assert z_symbols.abs().max() > 0
    # Each slice's stream decodes on its own to exactly these symbols.
    leaf = updated_model.latent_codec.y.latent_codec["y2"].gaussian_conditional
    indexes = encoded["indexes"]["y"][2]
    decoded_symbols = leaf.decompress(encoded["strings"][2], indexes)
    assert torch.equal(decoded_symbols.int(), encoded["symbols"]["y"][2])


def test_batch_elements_decode_independently(coded, updated_model):
    _, encoded, decoded, _, _ = coded
    first = [per_slice[:1] for per_slice in encoded["strings"]]
    with torch.no_grad():
        alone = updated_model.latent_codec.decompress(first, encoded["shape"])
    assert torch.allclose(alone["y_hat"], decoded["y_hat"][:1], rtol=1e-4, atol=1e-4)


class ReplayHead(nn.Module):
    """Context head that hands over fixed (scales, means) and a dummy one-channel support."""

    def __init__(self, scales: Tensor, means: Tensor) -> None:
        super().__init__()
        self.params = torch.cat([scales, means, torch.zeros_like(means[:, :1])], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.params


def _slice_widths(name: str) -> list[int] | None:
    """The channel widths of a configuration's y slices, as its master class states them (equal
    ``num_slices`` or uneven ``slice_proportions``); None for other latent structures."""
    kwargs = target_manifest(name)["resolved_kwargs"]
    if "slice_proportions" in kwargs:
        return [int(w) for w in kwargs["slice_proportions"]]
    if "num_slices" in kwargs:
        channels = fixture_expected(name)["y"].shape[1]
        return [channels // kwargs["num_slices"]] * kwargs["num_slices"]
    return None


#: configurations whose y is coded as channel slices with one Gaussian conditional (a checkerboard
#: codec's two passes are checked by the conformance suite's decisions instead)
CHANNEL_SLICED = [n for n in CONFIGURATION_NAMES
                  if _slice_widths(n) is not None and "gaussian_conditional.scale_table" in fixture_expected(n)]


@pytest.mark.parametrize("name", CHANNEL_SLICED)
def test_upstream_parameters_replayed_through_leaves_give_upstream_y(name):
    """Upstream's y, means and scales through our leaves: its likelihoods, and its y stream
    byte for byte once our per-slice symbols and indexes are packed the upstream way."""
    expected = fixture_expected(name)
    widths = _slice_widths(name)
    gc = None
    symbols, indexes = [], []
    with torch.no_grad():
        for k, width in enumerate(widths):
            leaf = LrpGaussianSliceCodec(nn.Conv2d(width + 1, width, 1), mean_support_trail_channels=1)
            leaf.eval()
            leaf.gaussian_conditional.update_scale_table(expected["gaussian_conditional.scale_table"])
            gc = leaf.gaussian_conditional
            for table in ("_quantized_cdf", "_offset", "_cdf_length"):
                assert torch.equal(getattr(gc, table), expected[f"gaussian_conditional.{table}"])
            start = sum(widths[:k])
            part = slice(start, start + width)
            ctx = ReplayHead(expected["scales"][:, part], expected["means"][:, part])(None)
            y_k = expected["y"][:, part]
            out = leaf(y_k, ctx)
            assert torch.allclose(
                out["likelihoods"]["y"], expected["likelihoods_y"][:, part], rtol=0, atol=1e-5
            )
            coded = leaf.compress(y_k, ctx)
            symbols.append(coded["symbols"])
            indexes.append(coded["indexes"])
    encoder = BufferedRansEncoder()
    encoder.encode_with_indexes(
        torch.cat([s.reshape(-1) for s in symbols]).tolist(),
        torch.cat([i.reshape(-1) for i in indexes]).tolist(),
        gc.quantized_cdf.tolist(),
        gc.cdf_length.reshape(-1).int().tolist(),
        gc.offset.reshape(-1).int().tolist(),
    )
    stream = encoder.flush()
    assert len(stream) == int(expected["string_nbytes_y"][0])
    assert stream == expected["strings_y_0"].numpy().tobytes()


# ----------------------------------------------------------------------------- loading


def test_compression_model_loads_empty_and_filled_tables(updated_model, coded):
    _, encoded, decoded, _, _ = coded
    empty_state = make_model(seed=7).state_dict()
    target = make_model(seed=5)
    target.load_state_dict(empty_state)
    assert all(
        torch.equal(value, empty_state[key]) for key, value in target.state_dict().items()
    )

    filled_state = updated_model.state_dict()
    loaded = make_model(seed=5)
    loaded.load_state_dict(filled_state)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, filled_state[key]), key
    with torch.no_grad():
        again = loaded.latent_codec.decompress(encoded["strings"], encoded["shape"])
    assert torch.equal(again["y_hat"], decoded["y_hat"])


# ----------------------------------------------------------------------------- class switch


def _module_and_class(spec: str) -> tuple[str, str]:
    """``"pkg.mod:Class"`` or ``"pkg.mod.Class"`` -> ``("pkg.mod", "Class")``."""
    module, sep, name = spec.partition(":")
    return (module, name) if sep else tuple(spec.rsplit(".", 1))


def test_installed_classes_reports_only_real_classes():
    found = installed.installed_classes()
    assert set(found) <= set(registry.family_names())
    for family, cls in found.items():
        module_name, class_name = _module_and_class(registry.family(family).target["compressai_class"])
        assert cls.__name__ == class_name
        assert cls.__module__ == module_name
    for family in set(registry.family_names()) - set(found):
        missing = re.escape(registry.family(family).target["compressai_class"])
        with pytest.raises(installed.MissingTargetClassError, match=missing):
            installed.target_class(family, "installed")


def test_installed_class_is_picked_up_when_present(monkeypatch):
    family = registry.family_names()[-1]
    module_name, class_name = _module_and_class(registry.family(family).target["compressai_class"])
    fake = types.ModuleType(module_name)
    setattr(fake, class_name, type(class_name, (), {}))
    monkeypatch.setitem(sys.modules, module_name, fake)
    assert installed.installed_classes()[family] is getattr(fake, class_name)
    assert installed.target_class(family, source="installed") is getattr(fake, class_name)


def test_our_classes_are_imported_lazily_by_module_path(monkeypatch):
    families = registry.families()
    module_name, class_name = _module_and_class(families[0].target["ours"])
    fake = types.ModuleType(module_name)
    setattr(fake, class_name, type(class_name, (), {}))
    monkeypatch.setitem(sys.modules, module_name, fake)
    sharing = [f.family for f in families if _module_and_class(f.target["ours"]) == (module_name, class_name)]
    for family in sharing:
        assert installed.target_class(family) is getattr(fake, class_name)
        assert installed.target_class(family, source="ours") is getattr(fake, class_name)
    other = next(f for f in families if _module_and_class(f.target["ours"])[0] != module_name)
    other_module, other_class = _module_and_class(other.target["ours"])
    monkeypatch.setitem(sys.modules, other_module, types.ModuleType(other_module))
    with pytest.raises(installed.MissingTargetClassError, match=f"no class {other_class}"):
        installed.target_class(other.family)


def test_bad_family_or_source_is_refused():
    unknown = "no_such_family"
    assert unknown not in registry.family_names()
    with pytest.raises(installed.MissingTargetClassError, match=f"unknown .*family '{unknown}'"):
        installed.target_class(unknown)
    with pytest.raises(ValueError, match="source must be"):
        installed.target_class(registry.family_names()[0], source="upstream")  # type: ignore[arg-type]
