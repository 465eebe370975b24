"""Mask sinks. Importing this package registers them (see stream/registry.py)."""
from . import evaluation, overlay, recorder, zmq_pub  # noqa: F401  (registration side effects)
