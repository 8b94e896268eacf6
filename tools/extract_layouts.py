"""Extract the layouts the package ships from the golden test data.

Run by hand when ``tests/data`` changes:  ``python tools/extract_layouts.py [DATA_DIR [OUT_DIR]]``
(defaults: ``tests/data`` and ``mappings/layouts``).

For each published configuration of the registry (``registry.configuration_names()``: the
``layout`` of every variant in ``mappings/*.yaml``) it writes ``OUT_DIR/<name>/``:

- ``target.json``: the CompressAI-master state-dict layout (key, shape, dtype, kind, in order);
  entropy-table entries whose size depends on ``update()`` get shape ``null``;
- ``upstream.json``: the upstream state-dict layout, the upstream class, kwargs and checkpoint
  container, plus the synthetic-weight recipe parameters (for ``--demo``);
- ``upstream_constants.safetensors``: the values of the upstream constant buffers.

A configuration whose data is missing is an error naming the missing file.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIABLE_SIZE = ("._quantized_cdf", "._offset", "._cdf_length", ".scale_table")


def configuration_names() -> list[str]:
    from lic_checkpoints.convert import registry

    return registry.configuration_names()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise SystemExit(f"extract_layouts: {path} is missing (see tests/data/README.md)")
    return json.loads(path.read_text())


#: how the upstream training script spells the keys of most families: no prefix, current names
PLAIN_SPELLING = {"key_prefix": "", "legacy_entropy_bottleneck": False}


def checkpoint_spelling(manifest: dict) -> dict:
    """The key spelling of the checkpoint the fixture's harness writes (``manifest.harness``): a
    ``module.`` prefix, compressai <= 1.2.6 entropy-bottleneck names."""
    harness = manifest.get("harness", {})
    return {"key_prefix": harness.get("key_prefix", ""),
            "legacy_entropy_bottleneck": bool(harness.get("rename_entropy_bottleneck_to_legacy", False))}


def extract(data: Path, out: Path, names: list[str]) -> None:
    for name in names:
        target = _read_json(data / "targets" / f"{name}.json")
        manifest = _read_json(data / "fixtures" / name / "manifest.json")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = [
            [key, None if key.endswith(VARIABLE_SIZE) else shape, dtype, kind]
            for key, shape, dtype, kind in target["state_dict"]
        ]
        (folder / "target.json").write_text(json.dumps({
            "name": name,
            "class": target["class"],
            "resolved_kwargs": target["resolved_kwargs"],
            "state_dict": rows,
        }, indent=0))
        recipe = {k: manifest["recipe"][k] for k in ("name", "seed", "gain", "matrix_scale", "vector_scale")}
        upstream = {
            "name": name,
            "upstream": manifest["upstream"],
            "constructor_kwargs": manifest["constructor_kwargs"],
            "checkpoint_container": {"top_level_keys": manifest["checkpoint_container"]["top_level_keys"]},
        }
        spelling = checkpoint_spelling(manifest)
        if spelling != PLAIN_SPELLING:  # recorded only where the training script writes other names
            upstream["checkpoint_spelling"] = spelling
        upstream.update(recipe=recipe, state_dict=manifest["state_dict"])
        (folder / "upstream.json").write_text(json.dumps(upstream, indent=0))
        shutil.copyfile(data / "fixtures" / name / "constants.safetensors", folder / "upstream_constants.safetensors")


def main(argv: list[str]) -> None:
    data = Path(argv[0]) if argv else ROOT / "tests" / "data"
    out = Path(argv[1]) if len(argv) > 1 else ROOT / "mappings" / "layouts"
    extract(data, out, configuration_names())


if __name__ == "__main__":
    main(sys.argv[1:])
