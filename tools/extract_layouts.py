"""Extract the layouts the package ships from the project's shared facts.

Run by hand when ``../shared`` changes:  ``python tools/extract_layouts.py ../shared``.

For each published configuration it writes ``mappings/layouts/<name>/``:

- ``target.json``: the CompressAI-master state-dict layout (key, shape, dtype, kind, in order);
  entropy-table entries whose size depends on ``update()`` get shape ``null``;
- ``upstream.json``: the upstream state-dict layout, the upstream class, kwargs and checkpoint
  container, plus the synthetic-weight recipe parameters (for ``--demo``);
- ``upstream_constants.safetensors``: the values of the upstream constant buffers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

NAMES = ("tcm_n64", "tcm_n128", "tcm_auxt_n64", "dcae", "saaf")
VARIABLE_SIZE = ("._quantized_cdf", "._offset", "._cdf_length", ".scale_table")


def main(shared: Path, out: Path) -> None:
    for name in NAMES:
        target = json.loads((shared / "targets" / f"{name}.json").read_text())
        manifest = json.loads((shared / "fixtures" / name / "manifest.json").read_text())
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
        (folder / "upstream.json").write_text(json.dumps({
            "name": name,
            "upstream": manifest["upstream"],
            "constructor_kwargs": manifest["constructor_kwargs"],
            "checkpoint_container": {"top_level_keys": manifest["checkpoint_container"]["top_level_keys"]},
            "recipe": recipe,
            "state_dict": manifest["state_dict"],
        }, indent=0))
        shutil.copyfile(shared / "fixtures" / name / "constants.safetensors", folder / "upstream_constants.safetensors")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parents[1] / "mappings" / "layouts")
