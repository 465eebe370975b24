"""Event sources. Importing this package registers them (see stream/registry.py)."""
from . import aedat4, camera, network, prefilter, synthetic  # noqa: F401  (registration side effects)
