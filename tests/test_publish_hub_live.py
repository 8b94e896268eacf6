"""Opt-in: push a converted checkpoint to a real Hub repository and download it back.

Runs only when ``HF_TOKEN`` (a write token) and ``LIC_HUB_TEST_REPO`` (a model repo you own, e.g.
``me/lic-checkpoints-test``) are set; ``LIC_HUB_TEST_ENDPOINT`` may point at a staging Hub.  It
pushes to a fresh branch ``lic-push-test-<random>`` (deleted afterwards) with a parity report that
says ``passed: false`` and ``--allow-failing-parity``, so the test card carries the warning banner
and never claims a parity it did not check.  About 180 MB go up and come back down.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from huggingface_hub import HfApi, ModelCard

from lic_checkpoints.convert import api, demo, registry
from lic_checkpoints.publish import bundle as bundle_mod
from lic_checkpoints.publish import cli
from lic_checkpoints.publish.hub import download_converted

TOKEN = os.environ.get("HF_TOKEN")
REPO = os.environ.get("LIC_HUB_TEST_REPO")
ENDPOINT = os.environ.get("LIC_HUB_TEST_ENDPOINT") or None

pytestmark = pytest.mark.skipif(not (TOKEN and REPO),
                                reason="live Hub test: set HF_TOKEN and LIC_HUB_TEST_REPO to run it")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("live")
    upstream = demo.demo_checkpoint(registry.smallest_configuration().name, work / "upstream.pth.tar")
    out = api.convert_checkpoint(upstream, work / "out").out_dir
    upstream.unlink()
    config = json.loads((out / "config.json").read_text())
    report = {"schema": bundle_mod.PARITY_SCHEMA, "passed": False, "family": config["family"],
              "variant": config["variant"], "tiers": {}}
    (out / "parity_report.json").write_text(json.dumps(report))
    return out


@pytest.fixture
def branch():
    name = f"lic-push-test-{uuid.uuid4().hex[:10]}"
    yield name
    HfApi(endpoint=ENDPOINT, token=TOKEN).delete_branch(REPO, branch=name)


def test_push_and_download_against_the_real_hub(folder, branch, tmp_path):
    args = [str(folder), REPO, "--revision", branch, "--allow-failing-parity"]
    if ENDPOINT:
        args += ["--endpoint", ENDPOINT]
    result = CliRunner().invoke(cli.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    local = download_converted(REPO, revision=branch, token=TOKEN, endpoint=ENDPOINT, cache_dir=tmp_path)
    for name in ("model.safetensors", "config.json", "parity_report.json"):
        assert (local / name).read_bytes() == (folder / name).read_bytes(), name
    card = ModelCard((local / "README.md").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert card.data.license == "mit" and config["family"] in card.data.tags
    assert card.text.lstrip().startswith("> [!WARNING]")
