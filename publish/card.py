"""The model card (README.md) of a published checkpoint, built with huggingface_hub's ModelCard.

The YAML front matter carries the Hub metadata (license, library, tags); the body says where the
weights come from, how to load them into the CompressAI-layout class, and embeds the parity report.
A card for a folder whose parity was not proven opens with a warning banner.
"""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

LIBRARY_NAME = "compressai"
BASE_TAGS = ("image-compression", "learned-image-compression", "compressai", "safetensors")
#: SPDX names as written in a mapping file -> the Hub's license identifiers.
HUB_LICENSES = {"mit": "mit", "apache-2.0": "apache-2.0", "bsd-3-clause": "bsd-3-clause", "cc-by-4.0": "cc-by-4.0"}
BANNER_MISSING = "No parity report was published with these weights"
BANNER_FAILED = "The parity check against the upstream code FAILED for these weights"


def metadata(config: dict[str, Any]) -> ModelCardData:
    """The card's front matter: license, library and tags (including the model family)."""
    family = config["family"]
    tags = [*BASE_TAGS, family]
    declared = str(config.get("license") or "unknown")
    hub_license = HUB_LICENSES.get(declared.lower())
    extra = {} if hub_license else {"license_name": declared.lower().replace(" ", "-")}
    return ModelCardData(license=hub_license or "other", library_name=LIBRARY_NAME, tags=tags, **extra)


def _banner(report: dict[str, Any] | None) -> str:
    if report is not None and report.get("passed") is True:
        return ""
    headline = BANNER_MISSING if report is None else BANNER_FAILED
    return (f"> [!WARNING]\n> **{headline}.** They were published with `--allow-failing-parity`: "
            "do not rely on them reproducing the paper's results until `lic-verify` passes.\n\n")


def _display_name(family: str) -> str:
    """The family's short name from its mapping file (the id itself for a family not shipped here)."""
    from lic_checkpoints.convert import registry
    from lic_checkpoints.convert.errors import LicError

    try:
        return registry.family(family).name
    except LicError:
        return family


def _title(config: dict[str, Any]) -> str:
    return f"# {_display_name(config['family'])} ({config['variant']}) in the CompressAI layout\n\n"


def _summary(config: dict[str, Any]) -> str:
    up, target = config["upstream"], config["target"]
    commit = up.get("commit")
    code = f"[{up['repo']}]({up['repo']})" if up.get("repo") else "unknown"
    if commit and up.get("repo"):
        code += f" at commit [`{commit[:12]}`]({up['repo']}/tree/{commit})"
    paper = f"[{up['paper']}]({up['paper']})" if up.get("paper") else "unknown"
    rows = [
        ("Family / variant", f"`{config['family']}` / `{config['variant']}`"),
        ("Paper", paper),
        ("Upstream code", code),
        ("Upstream class", f"`{up['class']}`"),
        ("CompressAI class", f"`{target.get('compressai_class') or target['class']}`"),
        ("Constructor arguments", f"`{json.dumps(target['kwargs'], sort_keys=True)}`"),
        ("License", f"{config.get('license')} (the upstream repository's license applies to these weights)"),
    ]
    table = "| | |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    return ("These are the authors' published weights, renamed and reshaped into the CompressAI "
            "master state-dict layout by `lic-convert`; no value was retrained.\n\n" + table + "\n")


def _usage(config: dict[str, Any], repo_id: str) -> str:
    target = config["target"]
    kwargs = ", ".join(f"{k}={v!r}" for k, v in target["kwargs"].items())
    text = (
        "## Usage\n\n"
        "With lic-checkpoints installed: the model with these weights, in eval mode, "
        "entropy tables built.\n\n"
        "```python\n"
        "import torch\n"
        "import lic_checkpoints as lic\n\n"
        f'net = lic.load("{repo_id}")\n'
        "x = torch.rand(1, 3, 256, 256)  # an RGB image in [0, 1]\n"
        "with torch.no_grad():\n"
        '    x_hat = net(x)["x_hat"]\n'
        'coded = net.compress(x)  # coded["strings"], coded["shape"] -> net.decompress(...)\n'
        "```\n\n"
    )
    module, _, name = (target.get("compressai_class") or "").rpartition(".")
    if module:
        text += (
            "With CompressAI master alone (its class holds exactly these keys):\n\n"
            "```python\n"
            "import safetensors.torch\n"
            "from huggingface_hub import hf_hub_download\n"
            f"from {module} import {name}\n\n"
            f"net = {name}({kwargs})\n"
            f'net.load_state_dict(safetensors.torch.load_file(hf_hub_download("{repo_id}", "model.safetensors")))\n'
            "net.eval().update(force=True)\n"
            "```\n\n"
            "CompressAI master's own port may compute differently from the authors' code; the parity report "
            "below is for lic-checkpoints' model, which follows the authors' numerics.\n\n"
        )
    return text


def _provenance(config: dict[str, Any]) -> str:
    src, mapping, tool = config["source"], config["mapping"], config["tool"]
    return (
        "## Provenance\n\n"
        f"- upstream file `{src['file']}`, sha256 `{src['sha256']}`\n"
        f"- mapping `{mapping['file']}` version {mapping['version']}, sha256 `{mapping['sha256']}`\n"
        + "".join(_dropped_line(d) for d in src.get("dropped") or [])
        + f"- converted by {tool['name']} {tool['version']}; full details in `config.json`\n\n"
    )


def _dropped_line(dropped: dict[str, Any]) -> str:
    """What a drop rule left out of these weights (e.g. a training-only branch), and whether it can come back."""
    back = "regenerated by `lic-convert --inverse`" if dropped["restorable"] else "not restorable"
    reason = f": {dropped['reason']}" if dropped.get("reason") else ""
    return f"- {dropped['count']} upstream tensors left out by rule '{dropped['rule']}' ({back}){reason}\n"


def _parity(report: dict[str, Any] | None, markdown: str | None) -> str:
    head = "## Parity with the upstream code\n\n"
    if report is None:
        return head + "No parity report was available when these weights were published.\n"
    verdict = "passed" if report["passed"] else "FAILED"
    body = markdown.strip() + "\n" if markdown else "(no Markdown rendering; see `parity_report.json`)\n"
    return head + f"`lic-verify` {verdict}; the full report is `parity_report.json`.\n\n" + body


def render(config: dict[str, Any], repo_id: str, *, report: dict[str, Any] | None,
           report_markdown: str | None) -> str:
    """The README.md text of the repository ``repo_id`` for a converted folder's config and report."""
    body = (_banner(report) + _title(config) + _summary(config) + _usage(config, repo_id)
            + _provenance(config) + _parity(report, report_markdown))
    card = ModelCard(f"---\n{metadata(config).to_yaml()}\n---\n\n{body}")
    return str(card)
