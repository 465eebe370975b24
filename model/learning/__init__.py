"""Unsupervised learning for SpikeSEG: soft-bounded STDP, winner-take-all, homeostasis.

Pure tensor functions only (no modules, no hidden state): :mod:`.stdp` (the rule and the
convergence metric ``C_l``), :mod:`.wta` (winner selection), :mod:`.homeostasis` (adaptive
thresholds).  The training loop is :mod:`model.train`; online adaptation :mod:`model.adapt`.
"""
from .homeostasis import HomeostasisParams, HomeostasisState
from .stdp import PRESETS, STDPParams, convergence, converged_ratio, map_convergence, stdp_update, update_winners
from .wta import MODES, Winners, select_winners

__all__ = [
    "HomeostasisParams",
    "HomeostasisState",
    "MODES",
    "PRESETS",
    "STDPParams",
    "Winners",
    "convergence",
    "converged_ratio",
    "map_convergence",
    "select_winners",
    "stdp_update",
    "update_winners",
]
