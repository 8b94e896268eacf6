"""lic-checkpoints: published learned-image-compression checkpoints in the CompressAI layout, with proof
of parity with the authors' code.

    import lic_checkpoints as lic

    result = lic.convert("checkpoint_best.pth.tar", "converted/")   # model.safetensors + config.json
    report = lic.verify("checkpoint_best.pth.tar", "converted/")    # parity tiers T0-T3
    release = lic.verify_release(["a.pth.tar", "b.pth.tar"], "out/") # a whole release, one report + rd.png
    net = lic.load("converted/")                                     # or lic.load("owner/name") from the Hub
    lic.restore("converted/", "upstream.pth.tar")                    # back to the authors' layout
    lic.push("converted/", "owner/name")                             # one Hub commit with the model card

Every error a user can act on is a :class:`LicError` whose message says what is wrong and what to do.
The code lives in the repository's top-level folders (``convert/``, ``mappings/``, ``verify/``,
``publish/``), installed as subpackages of this package.
"""

__version__ = "0.1.0"

import inspect
import types

from lic_checkpoints import convert as _convert_package  # noqa: E402
from lic_checkpoints import verify as _verify_package  # noqa: E402
from lic_checkpoints.api import LicError, load, push, restore, verify_release  # noqa: E402
from lic_checkpoints.api import convert as _convert
from lic_checkpoints.api import verify as _verify

__all__ = ["LicError", "__version__", "convert", "load", "push", "restore", "verify", "verify_release"]


class _CallablePackage(types.ModuleType):
    """A subpackage that is also the public function of its name.

    ``lic_checkpoints.convert`` and ``lic_checkpoints.verify`` are the folders ``convert/`` and
    ``verify/``; ``lic.convert(...)`` and ``lic.verify(...)`` are the public functions.  A plain
    function in their place would break ``import lic_checkpoints.verify.api as api`` and every dotted
    path through them, so each package calls its function instead and carries its docstring and
    signature (for ``help`` and ``inspect``).
    """

    def __call__(self, *args, **kwargs):
        return self.__public_function__(*args, **kwargs)


for _package, _function in ((_convert_package, _convert), (_verify_package, _verify)):
    _package.__class__ = _CallablePackage
    _package.__public_function__ = _function
    _package.__doc__ = _function.__doc__
    _package.__signature__ = inspect.signature(_function)

convert, verify = _convert_package, _verify_package
del _package, _function
