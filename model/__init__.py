"""SpikeSEG: neurons, encoder, decoder, HULK-SMASH instances, learning and checkpoints."""
from . import node  # noqa: F401  (registers the 'model' config section)
