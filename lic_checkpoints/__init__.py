"""lic-checkpoints: published LIC checkpoints in the CompressAI layout, with proof of parity.

The code lives in the repository's top-level folders (``convert/``, ``mappings/``, ``verify/``),
installed as subpackages of this package.
"""

__version__ = "0.1.0"
