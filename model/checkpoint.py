"""Checkpoints: one ``torch.save`` file of tensors and plain types, loaded with ``weights_only=True`` only.

Format ``spikestream.ckpt.v1`` (a dict)::

    format    "spikestream.ckpt.v1"
    w1        (4, C_in, 5, 5) float32   fixed Conv1 (recomputed from the config on load; stored for readers)
    w2        (36, 4, 5, 5) float32     learned
    w3        (n_classes, 36, 7, 7)     learned
    theta1/2/3  (C, 1, 1) float32       per-channel thresholds (learning may adapt them)
    config    dict                      the resolved ``model`` section, plain YAML-able values
    metadata  dict                      how it was made, e.g. {"trained": False, "note": ...}

Weights are size-independent (convolutions), so a checkpoint from one resolution runs at
any other.  Loading never unpickles arbitrary objects: ``torch.load(weights_only=True)``
refuses anything but tensors and plain containers (a crafted pickle whose ``__reduce__``
would run code is rejected before it runs).  Keys are strict: a missing or unknown key is
an error, never silently ignored.
"""
from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from stream.config import to_dict
from stream.node import NodeError, UsageError

from .config import ModelConfig
from .encoder import N_CONV2, Encoder

FORMAT = "spikestream.ckpt.v1"
KEYS = frozenset({"format", "w1", "w2", "w3", "theta1", "theta2", "theta3", "config", "metadata"})
#: The shipped weights, used when no --weights is given: Conv2 trained by `run.py train` (STDP +
#: WTA, checkpoint chosen by validation IoU on training-side scenes; docs/quality.md section 4).
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "default.pt"
#: The paper initialisation (N(0.8, 0.01) clipped, seed 42), untrained: the baseline the shipped
#: weights must beat, and what `make_init_weights` reproduces.
INIT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "init.pt"


class Checkpoint(NamedTuple):
    """A loaded, validated checkpoint (tensors on CPU)."""

    w1: Tensor
    w2: Tensor
    w3: Tensor
    thetas: tuple[Tensor, Tensor, Tensor]
    config: dict[str, Any]
    metadata: dict[str, Any]


def save_checkpoint(path: str | Path, encoder: Encoder, metadata: dict[str, Any]) -> None:
    """Write ``encoder``'s weights, thresholds and config to ``path`` (format v1)."""
    payload = {
        "format": FORMAT,
        "w1": encoder.w1.detach().cpu().clone(),
        "w2": encoder.w2.detach().cpu().clone(),
        "w3": encoder.w3.detach().cpu().clone(),
        "theta1": encoder.theta1.detach().cpu().clone(),
        "theta2": encoder.theta2.detach().cpu().clone(),
        "theta3": encoder.theta3.detach().cpu().clone(),
        "config": to_dict(encoder.cfg),
        "metadata": dict(metadata),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, str(path))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load and check the structure of a checkpoint file; one-line errors.

    UsageError: missing file (user input).  NodeError: not a checkpoint, pickled code
    refused, wrong format version, missing/unknown keys, wrong tensor shapes.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"checkpoint {p} not found; pass an existing .pt file to --weights or omit it for the default")
    try:
        with warnings.catch_warnings():
            # junk input makes torch warn about odd pickle protocols before failing: the
            # one-line error below says what matters
            warnings.simplefilter("ignore", UserWarning)
            data = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message is many lines of advice to pass weights_only=False: exactly what we refuse.
        raise NodeError(
            f"checkpoint {p} refused: not a SpikeStream checkpoint, or it holds pickled objects other than "
            "tensors (never unpickled); pass a spikestream.ckpt.v1 file written by save_checkpoint"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        # junk bytes reach torch's restricted unpickler, which fails with whatever its opcode
        # handlers hit (a KeyError on an unknown memo id, an IndexError on an empty stack ...)
        raise NodeError(f"{p} is not a SpikeStream checkpoint ({type(e).__name__}); pass a file written by save_checkpoint") from None
    if not isinstance(data, dict) or data.get("format") is None:
        raise NodeError(f"{p} is not a SpikeStream checkpoint (no 'format' key); pass a file written by save_checkpoint")
    if data["format"] != FORMAT:
        raise NodeError(f"checkpoint {p} has format {data['format']!r}; this version reads {FORMAT!r} only")
    missing, unknown = sorted(KEYS - set(data)), sorted(set(data) - KEYS)
    if missing or unknown:
        raise NodeError(f"checkpoint {p} is malformed: missing keys {missing}, unknown keys {unknown}; re-save it")
    for k in ("w1", "w2", "w3", "theta1", "theta2", "theta3"):
        if not isinstance(data[k], Tensor) or not data[k].is_floating_point():
            raise NodeError(f"checkpoint {p}: {k} is not a float tensor; re-save it")
        if data[k].dim() != (4 if k.startswith("w") else 3):
            raise NodeError(f"checkpoint {p}: {k} has shape {tuple(data[k].shape)}, not a weight/threshold shape; re-save it")
    if not isinstance(data["config"], dict) or not isinstance(data["metadata"], dict):
        raise NodeError(f"checkpoint {p}: config and metadata must be mappings; re-save it")
    return Checkpoint(
        w1=data["w1"].float(),
        w2=data["w2"].float(),
        w3=data["w3"].float(),
        thetas=(data["theta1"].float(), data["theta2"].float(), data["theta3"].float()),
        config=data["config"],
        metadata=data["metadata"],
    )


def apply_checkpoint(encoder: Encoder, ckpt: Checkpoint, where: str = "checkpoint") -> None:
    """Copy the learned weights and thresholds into ``encoder`` after checking shapes against its config.

    W1 is not copied: it is defined by the config (``conv1``, ``conv1_gain``, input channels);
    only its feature count and kernel size are checked, so one checkpoint serves 1- and
    2-channel input.

    Thresholds: an untrained checkpoint leaves the config's.  A trained one
    (``metadata["trained"] is True``) may carry thresholds that learning adapted per channel
    (homeostasis); what it carries is the adaptation, relative to the thresholds of the config
    it was saved with: ``theta = config theta x checkpoint theta / checkpoint config theta``
    (:func:`adapted_thresholds`).  Loaded with the config it was saved with, the checkpoint's
    thresholds come back exactly; with a preset or a ``theta*`` override, the override is
    applied and the adaptation kept (the shipped default carries none: its thresholds equal
    its config's, so every preset and override runs as configured).
    """
    n_cfg, n_ck = encoder.n_classes, ckpt.w3.shape[0]
    if ckpt.w3.dim() != 4 or n_ck != n_cfg:
        raise UsageError(
            f"{where} has n_classes={n_ck}, config has {n_cfg}; pass --n-classes {n_ck} or another checkpoint"
        )
    expect = {
        "w1": (ckpt.w1[:, :1], (encoder.w1.shape[0], 1, 5, 5)),
        "w2": (ckpt.w2, (N_CONV2, 4, 5, 5)),
        "w3": (ckpt.w3, (n_cfg, N_CONV2, 7, 7)),
        "theta1": (ckpt.thetas[0], tuple(encoder.theta1.shape)),
        "theta2": (ckpt.thetas[1], tuple(encoder.theta2.shape)),
        "theta3": (ckpt.thetas[2], tuple(encoder.theta3.shape)),
    }
    for name, (t, shape) in expect.items():
        if tuple(t.shape) != shape:
            raise UsageError(
                f"{where}: {name} has shape {tuple(t.shape)}, the config needs {shape} "
                "(Conv1 input channels / layer sizes differ); use a checkpoint made for this config"
            )
    with torch.no_grad():
        encoder.w2.copy_(ckpt.w2)
        encoder.w3.copy_(ckpt.w3)
        # loaded weights go onto the 2^-12 grid too (model.encoder.quantize_weights); a
        # checkpoint written by this version is already on it, so this is a no-op there
        encoder.quantize_()
        if ckpt.metadata.get("trained") is not True:
            return
        for i, name in enumerate(("theta1", "theta2", "theta3")):
            th = getattr(encoder, name)
            th.copy_(adapted_thresholds(th, ckpt.thetas[i], ckpt.config.get(name), f"{where}: {name}"))


def adapted_thresholds(configured: Tensor, saved: Tensor, saved_config: Any, where: str) -> Tensor:
    """``configured x saved / saved_config`` per channel: a trained checkpoint's threshold
    adaptation applied to the configured thresholds (all (C, 1, 1) float32).

    ``saved_config``: the checkpoint config's value (a number or a per-channel list); where
    it equals the configured value, ``saved`` is returned exactly (no rounding).  A checkpoint
    without it (``None``) keeps ``saved`` as it is.
    """
    if saved_config is None:
        return saved.to(configured.dtype)
    base = torch.as_tensor(saved_config, dtype=torch.float64).reshape(-1)
    if base.numel() not in (1, configured.numel()) or not bool((base > 0).all()):
        raise NodeError(f"{where}: checkpoint config value {saved_config!r} is not a threshold per channel; re-save it")
    base = base.expand(configured.numel()).reshape(configured.shape)
    conf = configured.detach().cpu()
    scaled = (conf.to(torch.float64) * saved.to(torch.float64) / base).to(configured.dtype)
    # compared in the thresholds' own precision: a config value such as 0.1 is the same
    # threshold in both configs even though float32(0.1) != 0.1
    return torch.where(conf == base.to(configured.dtype), saved.to(configured.dtype), scaled)


def load_into(encoder: Encoder, path: str | Path | None) -> Checkpoint:
    """Read ``path`` (None = the shipped default) and apply it to ``encoder``."""
    p = Path(path) if path is not None else DEFAULT_WEIGHTS
    ckpt = read_checkpoint(p)
    apply_checkpoint(encoder, ckpt, where=f"checkpoint {p}")
    return ckpt


def make_init_weights(path: str | Path = INIT_WEIGHTS, in_channels: int = 2) -> None:
    """Write the untrained paper initialisation (seed 42), fixed Conv1, 1 class (``init.pt``)."""
    enc = Encoder(ModelConfig(seed=42, n_classes=1), in_channels)
    save_checkpoint(path, enc, {"trained": False, "note": "paper initialisation, untrained", "seed": 42})
