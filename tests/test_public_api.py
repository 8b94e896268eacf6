"""The flat public API: ``import lic_checkpoints as lic``."""

from __future__ import annotations

import pydoc

import pytest
import torch

import lic_checkpoints as lic
from lic_checkpoints import api as public
from lic_checkpoints.convert import registry

from conftest import fixture_expected, fixture_input, upstream_checkpoint

PUBLIC = ("convert", "restore", "verify", "load", "push", "LicError")


def test_help_shows_every_public_name_with_an_example():
    text = pydoc.render_doc(lic, renderer=pydoc.plaintext)
    for name in PUBLIC:
        assert name in text
        assert name in lic.__all__
    for name in PUBLIC[:-1]:
        doc = getattr(lic, name).__doc__
        assert doc and "import lic_checkpoints as lic" in doc and f"lic.{name}(" in doc, name


def test_importing_the_package_imports_neither_torch_nor_compressai():
    import subprocess
    import sys

    code = "import sys, lic_checkpoints; print('torch' in sys.modules, 'compressai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_load_of_a_converted_folder_reproduces_the_golden_output(tmp_path):
    name = registry.configuration_names()[0]  # the first registered configuration
    src = tmp_path / "upstream.pth.tar"
    torch.save(upstream_checkpoint(name), src)
    result = lic.convert(src, tmp_path / "converted")
    src.unlink()
    assert isinstance(result.family, str) and result.out_dir == tmp_path / "converted"
    net = lic.load(tmp_path / "converted")
    assert not net.training
    with torch.no_grad():
        x_hat = net(fixture_input(name))["x_hat"]
    expected = fixture_expected(name)["x_hat"]
    assert torch.allclose(x_hat, expected, rtol=1e-4, atol=1e-4), float((x_hat - expected).abs().max())
    # entropy tables are built: compress/decompress work at once and decode to the forward output
    coded = net.compress(fixture_input(name))
    decoded = net.decompress(coded["strings"], coded["shape"])["x_hat"]
    with torch.no_grad():
        assert torch.equal(decoded, net(fixture_input(name))["x_hat"].clamp(0, 1))
    same = lic.load(tmp_path / "converted" / "model.safetensors")  # the file, config.json beside it
    assert type(same) is type(net)


def test_load_sends_hub_ids_to_the_hub_and_paths_to_disk(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, revision=None):
        calls.append((repo_id, revision))
        return tmp_path

    monkeypatch.setattr("lic_checkpoints.publish.hub.download_converted", fake_download)
    assert public._local_folder("owner/name", None) == tmp_path
    assert public._local_folder("hf://owner/name@v1", None) == tmp_path
    assert public._local_folder("owner/name", "dev") == tmp_path
    assert calls == [("owner/name", None), ("owner/name", "v1"), ("owner/name", "dev")]
    (tmp_path / "here").mkdir()
    assert public._local_folder(tmp_path / "here", None) == tmp_path / "here"
    assert len(calls) == 3


@pytest.mark.parametrize("spec", ["./missing-folder", "/no/such/place", "not-a-repo-id", "a/b/c"])
def test_load_of_something_that_is_neither_path_nor_hub_id_is_one_line(spec):
    with pytest.raises(lic.LicError, match="no such file or folder") as info:
        lic.load(spec)
    assert "\n" not in str(info.value)


def test_load_of_a_folder_without_config_is_one_line(tmp_path):
    with pytest.raises(lic.LicError, match="config.json: missing"):
        lic.load(tmp_path)


def test_push_refuses_a_repo_id_without_namespace_before_anything_else(tmp_path):
    with pytest.raises(lic.LicError, match="no-namespace"):
        lic.push(tmp_path, "no-namespace")


def test_public_functions_stay_callable_beside_the_subpackages_of_the_same_name():
    import inspect

    import lic_checkpoints.convert.api as convert_api  # dotted imports through the subpackages still work
    import lic_checkpoints.verify.api as verify_api

    assert callable(lic.convert) and callable(lic.verify)
    assert lic.convert.api is convert_api and lic.verify.api is verify_api
    assert list(inspect.signature(lic.convert).parameters)[:2] == ["src", "out_dir"]
    assert list(inspect.signature(lic.verify).parameters)[:2] == ["src", "converted"]
