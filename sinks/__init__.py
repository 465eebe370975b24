"""Mask sinks. Importing this package registers them (see stream/registry.py)."""
from . import zmq_pub, overlay, recorder  # noqa: F401  (registration side effects)
