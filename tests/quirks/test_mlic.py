"""MLIC++ (JiangWeibeta/MLIC): what only this family does, beyond the conformance suite.

Published MLIC++ files were written by ``playground/train.py`` right after ``net.update(force=True)``
with compressai 1.2.0b3: they carry *filled* entropy tables and the legacy ``_matrix{i}`` names,
and multi-GPU runs add ``module.``. Upstream's ``h_s`` and every entropy-parameters head put the
scales first, then the means. The checkerboard codes anchors, then non-anchors, and upstream's
``decompress`` does not clamp the image (so neither does ours, nor master's).
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from conftest import (
    CONFIGURATIONS,
    remove_tree,
    fixture_dir,
    fixture_expected,
    fixture_input,
    upstream_checkpoint,
    upstream_state_dict,
)
from lic_checkpoints.convert import api, registry
from lic_checkpoints.convert.cli import main as convert_main
from lic_checkpoints.verify.cli import main as verify_main
from lic_checkpoints.verify.loading import load_converted
from lic_checkpoints.verify.models.blocks.mlic_blocks import LocalContext, anchor_part

MLIC = [c for c in CONFIGURATIONS if c.family.family == "mlic"]
ids = [c.name for c in MLIC]


def _cli(main, args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the golden data was made with 2 threads
    yield
    torch.set_num_threads(before)


def _published_like(conf, tmp_path):
    """The golden checkpoint as a published file would hold it: the upstream model's state dict after
    ``update(force=True)`` (filled tables), legacy bottleneck names and a ``module.`` prefix."""
    upstream_cls = registry.import_class(conf.family.upstream["ours"])
    model = upstream_cls(**conf.upstream_kwargs).eval()
    model.load_state_dict(upstream_state_dict(conf.name))
    model.update(force=True)
    filled = model.state_dict()
    container = upstream_checkpoint(conf.name, key_prefix="module.", legacy_entropy_bottleneck=True)
    legacy = {"_matrix": "matrices.", "_bias": "biases.", "_factor": "factors."}
    state = {}
    for key in container["state_dict"]:  # the harness's spelling and order, the filled values
        plain = key.removeprefix("module.")
        for old, new in legacy.items():
            if plain.startswith(f"entropy_bottleneck.{old}"):
                plain = plain.replace(old, new, 1)
        state[key] = filled[plain].clone()
    container["state_dict"] = state
    path = tmp_path / "mlicpp_published_like.pth.tar"
    torch.save(container, path)
    return path, state


@pytest.mark.parametrize("conf", MLIC, ids=ids)
def test_filled_tables_with_legacy_names_convert_verify_and_come_back(conf, tmp_path, threads):
    path, state = _published_like(conf, tmp_path)
    assert "module.entropy_bottleneck._matrix0" in state
    assert state["module.gaussian_conditional._quantized_cdf"].numel() > 0  # filled, as published
    out = tmp_path / "converted"
    result = api.convert_checkpoint(path, out)
    assert result.plan.ok and result.spelling.key_prefix == "module."
    model = load_converted(out)
    for k in range(int(result.config["variables"]["K"])):
        gc = model.latent_codec.y.latent_codec[f"y{k}"].gaussian_conditional
        assert torch.equal(gc._quantized_cdf, state["module.gaussian_conditional._quantized_cdf"])
    eb = model.latent_codec.z.entropy_bottleneck
    assert torch.equal(eb._quantized_cdf, state["module.entropy_bottleneck._quantized_cdf"])
    # T0 (layout, strict load, inverse) and T2 (coding decisions with the stored tables) on the golden input
    code, stdout, stderr = _cli(verify_main, [path, out, "--tiers", "T0,T2",
                                              "--images", fixture_dir(conf.name) / "input.safetensors"])
    assert code == 0, stdout + stderr
    back = tmp_path / "back.pth.tar"
    code, stdout, stderr = _cli(convert_main, ["--inverse", out, "-o", back])
    assert code == 0, stdout + stderr
    restored = torch.load(back, weights_only=True)["state_dict"]
    assert list(restored) == list(state)  # the prefix, the legacy names and upstream's order
    assert all(torch.equal(restored[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def golden_target(checkpoints, tmp_path_factory):
    conf = MLIC[0]
    out = tmp_path_factory.mktemp("mlic") / "converted"
    api.convert_checkpoint(checkpoints.path(conf.name), out)
    model = load_converted(out)
    remove_tree(out.parent)  # the model holds its own tensors: the file need not stay for the session
    return conf, model


def test_scales_come_first_then_means(golden_target, threads):
    """h_s's output and every entropy-parameters head split as (scales, means): the LRP sees the
    second half of h_s (the means), and the anchors' scales are the head's first half."""
    conf, model = golden_target
    seen = {}
    leaf = model.latent_codec.y.latent_codec["y0"]
    hooks = [
        model.latent_codec.h_s.register_forward_hook(lambda m, i, o: seen.__setitem__("h_s", o)),
        leaf.entropy_parameters_anchor.register_forward_hook(lambda m, i, o: seen.__setitem__("head", o)),
        leaf.lrp_anchor.register_forward_pre_hook(lambda m, i: seen.__setitem__("lrp", i[0])),
    ]
    try:
        with torch.no_grad():
            out = model(fixture_input(conf.name), return_params=True)
    finally:
        for hook in hooks:
            hook.remove()
    M, c = model.M, model.slice_ch
    assert torch.equal(seen["lrp"][:, :M], seen["h_s"][:, M:])  # hyper means = second half
    assert torch.equal(anchor_part(out["para"]["scales"][:, :c]), anchor_part(seen["head"][:, :c]))
    assert torch.equal(anchor_part(out["para"]["means"][:, :c]), anchor_part(seen["head"][:, c:]))
    expected = fixture_expected(conf.name)
    assert torch.equal(out["para"]["scales"], expected["scales"])
    assert torch.equal(out["para"]["means"], expected["means"])


def test_decompress_does_not_clamp(golden_target, threads):
    conf, model = golden_target
    expected = fixture_expected(conf.name)
    x = fixture_input(conf.name)
    with torch.no_grad():
        forward = model(x)["x_hat"]
        encoded = model.compress(x)
        decoded = model.decompress(encoded["strings"], encoded["shape"])["x_hat"]
    assert decoded.min() < 0 or decoded.max() > 1  # the golden image leaves [0, 1] (37 % of it)
    assert torch.equal(decoded, forward)  # the raw forward reconstruction, exactly
    assert torch.equal(decoded, expected["decoded_x_hat"])
    # master's bitstream: anchors and non-anchors of each slice in their own stream, then z
    assert len(encoded["strings"]) == 2 * model.slice_num + 1


def test_local_context_masks_with_minus_100():
    """Upstream's additive mask is -100 (not -inf) wherever a window position is not an anchor."""
    context = LocalContext(dim=32, window_size=5)
    mask = context.attention_mask(4, 4, torch.device("cpu"))
    assert mask.shape == (16, 25, 25)
    assert set(mask.unique().tolist()) == {-100.0, 0.0}
    centre = 12  # the middle of a flattened 5x5 window
    assert mask[0 * 4 + 1, centre, centre] == 0.0  # (row 0, column 1) is an anchor
    assert mask[0 * 4 + 0, centre, centre] == -100.0  # (row 0, column 0) is not
    assert mask[1 * 4 + 0, centre, centre] == 0.0  # (row 1, column 0) is an anchor


@pytest.mark.master
@pytest.mark.parametrize("conf", MLIC, ids=ids)
def test_masters_checkerboard_codec_is_observed_and_matches(conf, tmp_path):
    """CompressAI master's two-pass checkerboard leaf (MultiContextCheckerboardLatentCodec) is observed
    through its own heads: lic-verify --target installed compares every slice's decisions as master
    coded them (anchors and non-anchors put back in place) and passes every tier."""
    from test_master import _verify, install_master

    folder = install_master.default_dir()
    problem = install_master.usable(folder)
    if problem is not None:
        pytest.skip(f"no CompressAI master: {problem}; build it with python tools/install_master.py")
    from lic_checkpoints.convert import demo

    source = demo.demo_checkpoint(conf.name, tmp_path / "checkpoint_best.pth.tar")
    converted = api.convert_checkpoint(source, tmp_path / "converted").out_dir
    code, report = _verify(folder, source, converted, conf, "T0,T1,T2,T3")
    failures = [(t, c["name"], c["detail"]) for t, tier in report["tiers"].items() for c in tier["checks"]
                if not c["passed"]]
    assert code == 0 and report["passed"], failures
    slices = [c for c in report["tiers"]["T2"]["checks"] if "symbols and scale indexes" in c["name"]]
    assert len(slices) == conf.target_kwargs["slice_num"] * len(report["inputs"])
    assert all(c["passed"] and not c["explained"] and "as coded" in c["detail"] for c in slices)
    own = next(c for c in report["tiers"]["T2"]["checks"] if c["name"].endswith("target decodes its own streams"))
    assert own["passed"] and own["values"]["max_abs"] < 1e-5, own


@pytest.mark.parametrize("conf", MLIC, ids=ids)
def test_upstream_repo_runs_a_clone_shaped_like_the_authors(conf, checkpoints, tmp_path):
    """--upstream-repo on a clone laid out like JiangWeibeta/MLIC: the package one folder down
    (``MLIC++/models``), the configuration passed as the clone's own ``utils.utils.Config``, the
    likelihoods named ``y_likelihoods`` / ``z_likelihoods``, no ``para`` in forward (y, means and
    scales are read from the gaussian_conditional calls), ``compressai.ops.ste_round`` imported
    (compressai >= 1.2.7 calls it ``quantize_ste``) and ``torch.cuda.synchronize`` called around
    coding.  The class is a stand-in built on our re-implementation (the tests have no network);
    the mapping's ``upstream.run`` section has to make all of it work."""
    from safetensors.torch import save_file

    from lic_checkpoints.verify import images

    ours_module, _, ours_class = conf.family.upstream["ours"].partition(":")
    root = tmp_path / "MLIC" / "MLIC++"
    for package in ("models", "utils"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "utils" / "utils.py").write_text(
        "class Config(dict):\n    __getattr__ = dict.__getitem__\n")
    (root / "models" / "mlicpp.py").write_text(
        "import torch\n"
        "from compressai.ops import ste_round\n"
        "from utils.utils import Config\n"
        f"from {ours_module} import {ours_class} as _Ours\n"
        f"class {conf.family.upstream['class']}(_Ours):\n"
        "    def __init__(self, config):\n"
        "        assert isinstance(config, Config) and isinstance(config.act, type)\n"
        "        super().__init__(config=dict(config))\n"
        "    def forward(self, x):\n"
        "        out = super().forward(x)\n"
        "        lik = out['likelihoods']\n"
        "        return {'x_hat': out['x_hat'], 'likelihoods': {'y_likelihoods': lik['y'], 'z_likelihoods': lik['z']}}\n"
        "    def compress(self, x):\n"
        "        torch.cuda.synchronize()\n"
        "        return super().compress(x)\n"
    )
    save_file({"x": images.synthetic(5, 64, 128)}, str(tmp_path / "x.safetensors"))
    code, stdout, stderr = _cli(verify_main, [checkpoints.path(conf.name), "--upstream-repo", tmp_path / "MLIC",
                                              "--tiers", "T1,T2", "--images", tmp_path / "x.safetensors",
                                              "--json", tmp_path / "r.json"])
    assert code == 0, stdout + stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"].startswith(f"the authors' {conf.family.upstream['class']} from")
    t1 = {c["name"].split(": ")[-1]: c for c in report["tiers"]["T1"]["checks"]}
    assert all(t1[name]["passed"] and t1[name]["values"]["max_abs"] == 0.0
               for name in ("y", "means", "scales", "likelihoods_y", "likelihoods_z", "x_hat")), t1
    # the sub-folder itself works too; a folder with neither is one line, exit 2
    code, stdout, stderr = _cli(verify_main, [checkpoints.path(conf.name), "--upstream-repo", root,
                                              "--tiers", "T1", "--images", tmp_path / "x.safetensors"])
    assert code == 0, stdout + stderr
    code, _, stderr = _cli(verify_main, [checkpoints.path(conf.name), "--upstream-repo", root / "utils",
                                         "--tiers", "T1", "--images", tmp_path / "x.safetensors"])
    assert code == 2 and "no 'MLIC++/models' package here" in stderr and "Traceback" not in stderr, stderr
