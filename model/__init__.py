"""SpikeSEG: neurons, encoder, decoder, HULK-SMASH instances, learning and checkpoints."""
# Importing registers the config sections: 'model' (node -> config), 'train', 'adapt'.
from . import adapt, node, train  # noqa: F401
