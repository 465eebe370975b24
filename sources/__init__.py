"""Event sources. Importing this package registers them (see stream/registry.py).

The import order is the order ``--help`` lists them in: the built-in default first.
"""
from . import synthetic, aedat4, camera, network, prefilter  # noqa: F401,I001  (registration side effects)
