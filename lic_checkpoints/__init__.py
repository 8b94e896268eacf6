"""lic-checkpoints: published learned-image-compression checkpoints in the CompressAI layout, with proof
of parity with the authors' code.

    import lic_checkpoints as lic

    result = lic.convert("checkpoint_best.pth.tar", "converted/")   # model.safetensors + config.json
    report = lic.verify("checkpoint_best.pth.tar", "converted/")    # parity tiers T0-T3
    net = lic.load("converted/")                                     # or lic.load("owner/name") from the Hub
    lic.restore("converted/", "upstream.pth.tar")                    # back to the authors' layout
    lic.push("converted/", "owner/name")                             # one Hub commit with the model card

Every error a user can act on is a :class:`LicError` whose message says what is wrong and what to do.
The code lives in the repository's top-level folders (``convert/``, ``mappings/``, ``verify/``,
``publish/``), installed as subpackages of this package.
"""

__version__ = "0.1.0"

from lic_checkpoints.api import LicError, convert, load, push, restore, verify  # noqa: E402

__all__ = ["LicError", "__version__", "convert", "load", "push", "restore", "verify"]
