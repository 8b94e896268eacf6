"""Load a ``lic-convert`` output into its CompressAI-layout model, the way a user would.

``config.json`` names the family and the constructor kwargs; the class is ours by default, or the
installed compressai's own (``source="installed"``, e.g. CompressAI master) when it ships one: then
the weights go through that class's own ``load_state_dict`` (strict), and a mismatch is one line.
A model file that changed after conversion is refused before it is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from lic_checkpoints.convert.api import CONFIG_FILE, MODEL_FILE
from lic_checkpoints.convert.errors import CheckpointError
from lic_checkpoints.convert.seal import check_seal


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; give a lic-convert output folder") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None


def load_converted(folder: str | Path, *, source: str = "ours", update: bool = True,
                   check_integrity: bool = True) -> nn.Module:
    """The model of a converted folder, weights loaded strictly, in eval mode (entropy tables built).

    Unless ``check_integrity`` is false, ``model.safetensors`` must first hash to the seal its
    ``config.json`` records (:mod:`lic_checkpoints.convert.seal`).
    """
    from safetensors.torch import load_file

    from .models.compressai.installed import target_class

    config = read_config(folder)
    cls = target_class(config["family"], source=source)
    model_path = Path(folder) / MODEL_FILE
    if check_integrity:
        check_seal(model_path, config, skip_hint="pass check_integrity=False")
    weights = load_file(str(model_path))
    if source == "installed":  # the installed compressai's own class and its own load_state_dict
        from .builders import load_installed

        model = load_installed(cls, config["target"]["kwargs"], weights)
    else:
        model = cls(**config["target"]["kwargs"])
        model.load_state_dict(weights, strict=True)
    if update:
        model.update(force=True)
    return model.eval()
