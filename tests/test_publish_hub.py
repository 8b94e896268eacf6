"""lic-push and download_converted against an in-process Hub double (no network).

The real huggingface_hub client runs unchanged; only its HTTP transport is replaced (see
``hub_double.py``).  Xet is switched off so that the large file takes the classic LFS route, which
the double can serve; these tests prove the client side and the bytes, not the Hub's acceptance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import httpx2
import huggingface_hub
import pytest
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub import constants as hf_constants
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import logging as hf_logging
from safetensors.torch import load as safetensors_load

import hub_double
from lic_checkpoints.convert import api, demo, registry
from lic_checkpoints.publish import bundle as bundle_mod
from lic_checkpoints.publish import card, cli
from lic_checkpoints.publish.errors import DownloadError
from lic_checkpoints.publish.hub import download_converted

TOKEN = "hf_H6doubleTOKENneverPRINTED0123"
CONFIGURATION = registry.smallest_configuration()
REPO = f"lic-test/{CONFIGURATION.name.replace('_', '-')}"
PUBLISHED = ("README.md", "model.safetensors", "config.json", "parity_report.json")
PARITY_MD = "| tier | result |\n|---|---|\n| forward | passed |\n"


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A real lic-convert output folder (the smallest configuration's demo), converted once for the module."""
    work = tmp_path_factory.mktemp("convert")
    upstream = demo.demo_checkpoint(CONFIGURATION.name, work / "upstream.pth.tar")
    converted = api.convert_checkpoint(upstream, work / "compressai").out_dir
    upstream.unlink()
    return converted


def _parity(folder: Path, passed: bool | None, config: dict) -> None:
    """Write a minimal parity report the way lic-verify will (``None``: no report at all)."""
    if passed is None:
        return
    report = {"schema": bundle_mod.PARITY_SCHEMA, "passed": passed, "family": config["family"],
              "variant": config["variant"], "tiers": {"forward": {"passed": passed}}}
    (folder / "parity_report.json").write_text(json.dumps(report, indent=2))
    (folder / "parity_report.md").write_text(PARITY_MD.replace("passed |", f"{'passed' if passed else 'FAILED'} |"))


@pytest.fixture
def make_folder(converted, tmp_path):
    """A folder to publish: the converted files (hard links) plus a parity report in a chosen state."""
    def make(passed: bool | None = True, name: str = "out") -> Path:
        folder = tmp_path / name
        folder.mkdir()
        for item in ("model.safetensors", "config.json"):
            os.link(converted / item, folder / item)
        _parity(folder, passed, json.loads((converted / "config.json").read_text()))
        return folder
    return make


@pytest.fixture(autouse=True)
def isolated_client(monkeypatch, tmp_path):
    """No real token, cache, Xet, progress bar or back-off sleep leaks into (or out of) a test."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf_home"
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hf_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(home / ".agent_harnesses.json"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    sleeps: list[float] = []
    monkeypatch.setattr(hf_http, "time", types.SimpleNamespace(sleep=sleeps.append))
    huggingface_hub.utils.disable_progress_bars()
    verbosity = hf_logging.get_verbosity()
    yield sleeps
    hf_logging.set_verbosity(verbosity)
    huggingface_hub.utils.enable_progress_bars()


@pytest.fixture
def hub():
    with hub_double.installed(hub_double.FakeHub({TOKEN})) as fake:
        yield fake


class RecordingHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def push(folder: Path, *extra: str, token: str | None = TOKEN, repo: str = REPO):
    args = [str(folder), repo, "--endpoint", hub_double.ENDPOINT, *extra]
    if token is not None:
        args += ["--token", token]
    return CliRunner().invoke(cli.main, args, catch_exceptions=False)


def assert_one_line_failure(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lic-push: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert TOKEN not in result.output


def expected_card(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    report = json.loads((folder / "parity_report.json").read_text())
    return card.render(config, REPO, report=report, report_markdown=(folder / "parity_report.md").read_text())


# ---- a successful push ---------------------------------------------------------------------------
def test_push_is_one_commit_with_exactly_the_files(hub, make_folder):
    folder = make_folder()
    result = push(folder)
    assert result.exit_code == 0, result.output
    assert REPO in hub.repos and hub.calls("POST", "/api/repos/create") == 1
    (commit,) = hub.pushed_commits()
    assert hub.calls("POST", "/commit/") == 1
    assert sorted(commit.files) == sorted([".gitattributes", *PUBLISHED])
    for name in ("model.safetensors", "config.json", "parity_report.json"):
        assert commit.files[name] == (folder / name).read_bytes(), name
    assert commit.files["README.md"].decode() == expected_card(folder)
    assert commit.lfs == {"model.safetensors"}  # the weights went through the LFS upload, not inline
    assert commit.oid in result.stdout


def test_download_returns_the_pushed_files(hub, make_folder, tmp_path):
    folder = make_folder()
    assert push(folder).exit_code == 0
    (commit,) = hub.pushed_commits()
    local = download_converted(REPO, endpoint=hub_double.ENDPOINT, cache_dir=tmp_path / "cache")
    assert local.name == commit.oid
    for name in PUBLISHED:
        assert (local / name).read_bytes() == commit.files[name], name
    for name in ("model.safetensors", "config.json", "parity_report.json"):
        assert (local / name).read_bytes() == (folder / name).read_bytes(), name


def test_model_card_metadata_and_body(hub, make_folder):
    folder = make_folder()
    assert push(folder).exit_code == 0
    (commit,) = hub.pushed_commits()
    parsed = ModelCard(commit.files["README.md"].decode())
    config = json.loads((folder / "config.json").read_text())
    assert parsed.data.license == "mit" and config["license"] == "MIT"
    assert parsed.data.library_name == "compressai"
    assert {"image-compression", "learned-image-compression", "compressai", config["family"]} <= set(parsed.data.tags)
    body = parsed.text
    assert "[!WARNING]" not in body
    assert config["upstream"]["paper"] in body and config["upstream"]["repo"] in body
    assert f'net = lic.load("{REPO}")' in body and "net.eval().update(force=True)" in body
    kwargs = ", ".join(f"{k}={v!r}" for k, v in config["target"]["kwargs"].items())
    module, _, name = config["target"]["compressai_class"].rpartition(".")
    assert f"from {module} import {name}\n" in body and f"net = {name}({kwargs})\n" in body
    assert PARITY_MD.strip() in body


def test_model_card_says_what_a_drop_rule_left_out(make_folder):
    """A conversion that dropped upstream tensors (a training-only branch) says so in the card, with the
    rule, the count, the reason and whether --inverse can give them back."""
    folder = make_folder()
    config = json.loads((folder / "config.json").read_text())
    assert "left out by rule" not in card.render(config, REPO, report=None, report_markdown=None)
    config["source"]["dropped"] = [
        {"rule": "aux branch", "count": 12, "restorable": False, "reason": "training only"},
        {"rule": "derived", "count": 3, "restorable": True, "reason": ""},
    ]
    body = card.render(config, REPO, report=None, report_markdown=None)
    assert "- 12 upstream tensors left out by rule 'aux branch' (not restorable): training only\n" in body
    assert "- 3 upstream tensors left out by rule 'derived' (regenerated by `lic-convert --inverse`)\n" in body


def test_card_usage_snippet_runs(hub, make_folder):
    """The card's own Python block, run as written (snapshot_download served by the double)."""
    assert push(make_folder()).exit_code == 0
    (commit,) = hub.pushed_commits()
    text = commit.files["README.md"].decode()
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102 - our own generated card
    net = namespace["net"]
    assert type(net) is registry.import_class(CONFIGURATION.family.target["ours"])
    assert not net.training and namespace["x_hat"].shape == namespace["x"].shape
    assert net.decompress(namespace["coded"]["strings"], namespace["coded"]["shape"])["x_hat"].shape == namespace["x"].shape
    published = safetensors_load(commit.files["model.safetensors"])
    parameters = dict(net.named_parameters())
    assert parameters and all(value.equal(published[key]) for key, value in parameters.items())


def test_revision_goes_to_a_new_branch(hub, make_folder):
    result = push(make_folder(), "--revision", "converted-v1", "--private", "--commit-message", "first upload")
    assert result.exit_code == 0, result.output
    assert hub.repos[REPO].private
    branch = hub.commits(REPO, "converted-v1")
    assert len(branch) == 2 and branch[-1].message == "first upload"
    assert len(hub.commits(REPO, "main")) == 1  # main keeps only its initial commit
    assert push(make_folder(name="again"), "--revision", "converted-v1").exit_code == 0  # branch exists: fine
    assert len(hub.commits(REPO, "converted-v1")) == 3


def test_dry_run_stages_the_files_and_contacts_nobody(hub, make_folder, tmp_path):
    folder = make_folder()
    staging = tmp_path / "staged"
    result = push(folder, "--dry-run", "--stage-dir", str(staging))
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    assert sorted(p.name for p in staging.iterdir()) == sorted(PUBLISHED)
    for name in ("model.safetensors", "config.json", "parity_report.json"):
        assert (staging / name).read_bytes() == (folder / name).read_bytes()
    assert (staging / "README.md").read_text() == expected_card(folder)
    for name in PUBLISHED:
        data = (staging / name).read_bytes()
        row = next(line for line in result.stdout.splitlines() if line.split()[0] == name)
        assert str(len(data)) in row and hashlib.sha256(data).hexdigest() in row
    again = push(folder, "--dry-run", "--stage-dir", str(staging))  # re-staging the same files is allowed
    assert again.exit_code == 0 and hub.requests == []
    (staging / "notes.txt").write_text("mine")
    assert_one_line_failure(push(folder, "--dry-run", "--stage-dir", str(staging)), "notes.txt")


def test_dry_run_through_python_m(make_folder, tmp_path):
    folder = make_folder()
    staging = tmp_path / "staged"
    run = subprocess.run([sys.executable, "-m", "lic_checkpoints.publish.cli", str(folder), REPO, "--dry-run",
                          "--stage-dir", str(staging)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in staging.iterdir()) == sorted(PUBLISHED)


# ---- failures ------------------------------------------------------------------------------------
COMMIT = r"/api/models/.+/commit/"
LFS_PUT = r"/lfs-storage/"
NOTHING, REFUSED, UNKNOWN = "no commit was made", "the commit was refused", "may or may not have landed"
FAILURES = {
    "403 on create": (("POST", r"/api/repos/create"), {"status": 403}, ("403", NOTHING)),
    "401 on commit": (("POST", COMMIT), {"status": 401}, ("401", REFUSED)),
    "403 on commit": (("POST", COMMIT), {"status": 403}, ("403", REFUSED)),
    "500 on commit": (("POST", COMMIT), {"status": 500}, ("HTTP 500", UNKNOWN)),
    "503 on upload": (("PUT", LFS_PUT), {"status": 503}, ("HTTP 503", NOTHING)),
    "timeout on upload": (("PUT", LFS_PUT), {"exception": httpx2.ReadTimeout}, ("did not answer in time", NOTHING)),
    "drop on upload": (("PUT", LFS_PUT), {"exception": httpx2.RemoteProtocolError}, ("RemoteProtocolError", NOTHING)),
    "drop on commit": (("POST", COMMIT), {"exception": httpx2.ReadError}, ("ReadError", UNKNOWN)),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_hub_failure_is_one_line_and_leaves_no_commit(hub, make_folder, case, isolated_client):
    (method, pattern), injected, fragments = FAILURES[case]
    fault = hub.fail_on(method, pattern, **injected)
    client_log = RecordingHandler()
    hf_logging.get_logger("huggingface_hub").addHandler(client_log)
    try:
        result = push(make_folder())
    finally:
        hf_logging.get_logger("huggingface_hub").removeHandler(client_log)
    assert_one_line_failure(result, *fragments)
    assert not any("Retrying" in r.getMessage() for r in client_log.records)  # the client's retry log stays quiet
    assert fault.hits >= 1
    assert hub.pushed_commits() == []
    if "upload" in case:
        assert hub.calls("POST", "/commit/") == 0
    if case == "503 on upload":  # huggingface_hub retries the storage PUT itself before giving up
        assert fault.hits == 6 and len(isolated_client) == 5
    if case == "500 on commit":  # ... but sends a commit only once
        assert fault.hits == 1


def test_wrong_token_is_refused_on_create(hub, make_folder):
    result = push(make_folder(), token="hf_not_the_right_one")
    assert_one_line_failure(result, "401", "no commit was made")
    assert "hf_not_the_right_one" not in result.output
    assert hub.repos == {} and hub.calls("POST", "/commit/") == 0


def test_download_errors(hub, make_folder, tmp_path):
    with pytest.raises(DownloadError, match=r"lic-test/missing: not found \(404\)") as missing:
        download_converted("lic-test/missing", endpoint=hub_double.ENDPOINT, cache_dir=tmp_path / "c")
    assert "\n" not in str(missing.value)
    assert push(make_folder()).exit_code == 0
    with pytest.raises(DownloadError, match="revision not found") as no_rev:
        download_converted(REPO, revision="nope", endpoint=hub_double.ENDPOINT, cache_dir=tmp_path / "c")
    assert "\n" not in str(no_rev.value)
    with pytest.raises(DownloadError, match="401") as bad_token:
        download_converted(REPO, token="hf_wrong", endpoint=hub_double.ENDPOINT, cache_dir=tmp_path / "c")
    assert "hf_wrong" not in str(bad_token.value)


# ---- parity gate ---------------------------------------------------------------------------------
@pytest.mark.parametrize("passed, fragment", [(None, "no parity_report.json"), (False, "FAILED")])
def test_refuses_without_passing_parity(hub, make_folder, passed, fragment):
    result = push(make_folder(passed))
    assert_one_line_failure(result, fragment, "--allow-failing-parity")
    assert hub.requests == []


@pytest.mark.parametrize("passed, banner", [(None, card.BANNER_MISSING), (False, card.BANNER_FAILED)])
def test_allow_failing_parity_puts_a_banner_on_top(hub, make_folder, passed, banner):
    result = push(make_folder(passed), "--allow-failing-parity")
    assert result.exit_code == 0, result.output
    assert "WARNING" in result.stderr
    (commit,) = hub.pushed_commits()
    body = ModelCard(commit.files["README.md"].decode()).text
    assert body.lstrip().startswith(f"> [!WARNING]\n> **{banner}.**")
    assert ("parity_report.json" in commit.files) == (passed is not None)


@pytest.mark.parametrize("remove, fragment", [("model.safetensors", "no model.safetensors"),
                                               ("config.json", "no config.json")])
def test_refuses_an_incomplete_folder(hub, make_folder, remove, fragment):
    folder = make_folder()
    (folder / remove).unlink()
    assert_one_line_failure(push(folder, "--allow-failing-parity"), fragment)
    assert_one_line_failure(push(folder.parent / "absent"), "not a folder")
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "bad id!"])
def test_refuses_a_malformed_repo_id(hub, make_folder, repo_id):
    assert_one_line_failure(push(make_folder(), repo=repo_id), repr(repo_id))
    assert hub.requests == []


def test_refuses_a_report_for_another_model(hub, make_folder):
    folder = make_folder()
    report = json.loads((folder / "parity_report.json").read_text())
    (folder / "parity_report.json").write_text(json.dumps({**report, "variant": "N128"}))
    assert_one_line_failure(push(folder, "--allow-failing-parity"), "N128", "re-run lic-verify")
    assert hub.requests == []


# ---- the token stays secret ----------------------------------------------------------------------
def test_token_never_written_or_printed(hub, make_folder, tmp_path, monkeypatch):
    folder = make_folder()
    staging = tmp_path / "staged"
    outputs = [push(folder, "--dry-run", "--stage-dir", str(staging)).output, push(folder).output]
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    outputs.append(push(make_folder(name="env"), "--revision", "b2", token=None).output)
    assert all(hub.requests) and len(hub.pushed_commits()) == 2
    local = download_converted(REPO, endpoint=hub_double.ENDPOINT, cache_dir=tmp_path / "cache")
    secret = TOKEN.encode()
    assert not any(TOKEN in text for text in outputs)
    written = [p for root in (staging, tmp_path / "cache", local, folder) for p in root.rglob("*") if p.is_file()]
    assert written and not any(secret in p.read_bytes() for p in written)
    assert not any(secret in data for c in hub.pushed_commits() for data in c.files.values())
