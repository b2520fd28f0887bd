"""Sequence datasets for the state-space models: loading, padding, checking.

A split is a dict of model inputs, batch-first: ``{"x": float32 (N, T, D), "mask": bool (N, T)}``
(plus ``"u"`` (N, T, U) for controlled systems). Sequences of different lengths are padded at
the end with zeros and masked. Where the true latent states are known (simulations) they are
kept apart, in ``SequenceDataset.states``, so they never reach a model or a guide.

The datasets and where they come from:

``linear-gaussian``
    Krishnan, Shalit & Sontag (2017), section 6.2: the 1-D linear-Gaussian system
    z_1 ~ N(0, 1), z_t ~ N(z_{t-1} + 0.05, 10), x_t ~ N(0.5 z_t, 20) (variances), 5,000
    training sequences of T = 25 (and 500 valid, 500 test), simulated with a fixed seed.
    ``krishnan_linear_model()`` is the generating model, whose Kalman filter is the oracle.
``pendulum``
    A noisy pendulum observed through a nonlinear emission: angle and angular velocity
    follow a discretized pendulum with process noise; what is seen is (sin angle, cos angle)
    plus Gaussian noise, never the velocity.
``nile``
    The annual flow of the Nile at Aswan, 1871-1970 (100 values, in 10^8 m^3), shipped in
    ``inference/data_files/nile.csv`` (Cobb 1978; Durbin & Koopman 2012, ch. 2; public domain).
``jsb``
    The JSB chorales as piano rolls (Boulanger-Lewandowski, Bengio & Vincent 2012): 229 / 76 /
    77 chorales, 88 binary keys (MIDI pitches 21-108) per time step, read from the authors'
    ``JSB Chorales.pickle`` under ``<root>/jsb_chorales/`` or downloaded there when asked.
"""

from __future__ import annotations

import csv
import math
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bayeszoo.inference.data import _ArrayUnpickler
from bayeszoo.models.dkf import LinearGaussianSSM, check_sequences

SEQUENCE_DATASETS: tuple[str, ...] = ("linear-gaussian", "pendulum", "nile", "jsb")
SPLITS = ("train", "valid", "test")
DATA_FILES = Path(__file__).with_name("data_files")

JSB_URL = "http://www-etud.iro.umontreal.ca/~boulanni/JSB%20Chorales.pickle"
JSB_FILE = "JSB Chorales.pickle"
JSB_FOLDER = "jsb_chorales"
PIANO_LOW, PIANO_KEYS = 21, 88  # MIDI pitch of A0, number of keys


@dataclass
class SequenceDataset:
    """Three splits of model inputs, plus the true latent states where they are known."""

    name: str
    train: dict[str, torch.Tensor] = field(repr=False)
    valid: dict[str, torch.Tensor] = field(repr=False)
    test: dict[str, torch.Tensor] = field(repr=False)
    x_dim: int
    u_dim: int = 0
    states: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    note: str | None = None  # what a reader of the scores must know about the splits

    def split(self, which: str) -> dict[str, torch.Tensor]:
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; valid choices: {', '.join(SPLITS)}")
        return getattr(self, which)

    def batch_transform(self, batch: dict, generator=None) -> dict:
        """Sequences need no per-minibatch transform (images use it for binarization)."""
        return batch

    def num_steps(self, which: str) -> int:
        """Observed time steps in a split (the denominator of per-step numbers)."""
        return int(self.split(which)["mask"].sum())


def per_step(per_sequence: torch.Tensor, mask: torch.Tensor) -> float:
    """Total over sequences divided by the number of observed time steps: the per-time-step
    numbers of Krishnan et al. (2017) (nats per step)."""
    return float(per_sequence.sum() / mask.sum())


def pad_sequences(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (T_i, D) tensors into x (N, max T_i, D), zero-padded at the end, and the mask."""
    if not sequences:
        raise ValueError("no sequences to pad")
    longest = max(len(s) for s in sequences)
    x = torch.zeros(len(sequences), longest, sequences[0].shape[-1])
    mask = torch.zeros(len(sequences), longest, dtype=torch.bool)
    for i, s in enumerate(sequences):
        x[i, :len(s)] = s
        mask[i, :len(s)] = True
    return x, mask


def check_sequence_split(split: dict[str, torch.Tensor], x_dim: int | None = None, u_dim: int = 0) -> None:
    """Raise a clear ValueError unless a split is well formed (shapes, dtypes, finite, padding
    only at the end of each sequence)."""
    if "x" not in split:
        raise ValueError(f"split has no 'x' entry (keys: {sorted(split)})")
    mask = check_sequences(split["x"], split.get("mask"), split.get("u"), x_dim=x_dim, u_dim=u_dim)
    if not torch.isfinite(split["x"]).all():
        raise ValueError("x contains NaN or infinite values")
    if mask is not None and (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError("mask must mark a prefix of every sequence (padding only at the end)")


# ----------------------------------------------------------------------------------------------
# Simulations


def krishnan_linear_model() -> LinearGaussianSSM:
    """z_1 ~ N(0, 1), z_t ~ N(z_{t-1} + 0.05, 10), x_t ~ N(0.5 z_t, 20): the linear-Gaussian
    system of Krishnan et al. (2017), section 6.2, held fixed (no trainable parameters)."""
    model = LinearGaussianSSM(x_dim=1, z_dim=1)
    model.set_parameters(mu_0=0.0, Sigma_0=1.0, A=1.0, b=0.05, Q=10.0, C=0.5, d=0.0, R=20.0)
    return model.requires_grad_(False)


def _simulate_splits(model, sizes: tuple[int, int, int], num_steps: int, seed: int):
    splits, states = {}, {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for name, size in zip(SPLITS, sizes, strict=True):
            z, x = model.simulate(size, num_steps)
            splits[name] = {"x": x.float(), "mask": torch.ones(size, num_steps, dtype=torch.bool)}
            states[name] = z.float()
    return splits, states


def linear_gaussian_dataset(sizes: tuple[int, int, int] = (5000, 500, 500), num_steps: int = 25,
                            seed: int = 0) -> SequenceDataset:
    """Sequences from ``krishnan_linear_model()`` (section 6.2 of Krishnan et al. 2017)."""
    splits, states = _simulate_splits(krishnan_linear_model(), sizes, num_steps, seed)
    return SequenceDataset("linear-gaussian", **splits, x_dim=1, states=states)


def pendulum_dataset(sizes: tuple[int, int, int] = (2000, 200, 200), num_steps: int = 50,
                     dt: float = 0.1, process_noise: float = 0.05, observation_noise: float = 0.1,
                     seed: int = 0) -> SequenceDataset:
    """A noisy pendulum seen through a nonlinear emission.

        omega_t = omega_{t-1} - dt * 9.81 * sin(theta_{t-1}) + process_noise * eps_t
        theta_t = theta_{t-1} + dt * omega_t
        x_t     = (sin theta_t, cos theta_t) + observation_noise * nu_t

    with theta_1 ~ U(-pi, pi) and omega_1 ~ N(0, 1). The states (theta, omega) are returned in
    ``states``; the velocity is never observed.
    """
    generator = torch.Generator().manual_seed(seed)
    splits, states = {}, {}
    for name, size in zip(SPLITS, sizes, strict=True):
        theta = (torch.rand(size, generator=generator) * 2 - 1) * math.pi
        omega = torch.randn(size, generator=generator)
        path = []
        for _ in range(num_steps):
            path.append(torch.stack([theta, omega], -1))
            noise = process_noise * torch.randn(size, generator=generator)
            omega = omega - dt * 9.81 * torch.sin(theta) + noise
            theta = theta + dt * omega
        z = torch.stack(path, 1)
        clean = torch.stack([torch.sin(z[..., 0]), torch.cos(z[..., 0])], -1)
        x = clean + observation_noise * torch.randn(clean.shape, generator=generator)
        splits[name] = {"x": x, "mask": torch.ones(size, num_steps, dtype=torch.bool)}
        states[name] = z
    return SequenceDataset("pendulum", **splits, x_dim=2, states=states)


# ----------------------------------------------------------------------------------------------
# The Nile


def load_nile() -> dict[str, torch.Tensor]:
    """The Nile series: {"year": int64 (100,), "flow": float64 (100,)} (see the module doc)."""
    path = DATA_FILES / "nile.csv"
    with path.open() as handle:
        rows = list(csv.DictReader(line for line in handle if not line.startswith("#")))
    years = torch.tensor([int(r["year"]) for r in rows])
    flow = torch.tensor([float(r["flow"]) for r in rows], dtype=torch.float64)
    if len(rows) != 100 or years[0] != 1871 or years[-1] != 1970:
        raise ValueError(f"{path} is damaged: expected the 100 years 1871-1970")
    return {"year": years, "flow": flow}


NILE_NOTE = ("the Nile is one series of 100 values: train, valid and test are all that series, "
             "so every score is in-sample")


def nile_dataset() -> SequenceDataset:
    """The Nile as a dataset of one sequence (1, 100, 1), the same in all three splits (there is
    no second series to hold out; ``note`` says so in every score). float32 holds the flows, whole
    numbers below 2^24, exactly."""
    flow = load_nile()["flow"].float().view(1, -1, 1)
    split = {"x": flow, "mask": torch.ones(1, flow.shape[1], dtype=torch.bool)}
    return SequenceDataset("nile", train=split, valid=split, test=split, x_dim=1, note=NILE_NOTE)


# ----------------------------------------------------------------------------------------------
# JSB chorales


class _PlainDataUnpickler(_ArrayUnpickler):
    """Reads plain Python containers, numbers and numpy scalars/arrays only: any other class or
    function named in the file is refused, so a tampered file cannot run code."""

    _ALLOWED = _ArrayUnpickler._ALLOWED | {("numpy.core.multiarray", "scalar"),
                                           ("numpy._core.multiarray", "scalar")}


def piano_roll(chorale, keys: int = PIANO_KEYS, low: int = PIANO_LOW) -> torch.Tensor:
    """A list of time steps, each a collection of MIDI pitches, as a binary (T, 88) tensor."""
    roll = torch.zeros(len(chorale), keys)
    for t, notes in enumerate(chorale):
        for pitch in notes:
            key = int(pitch) - low
            if not 0 <= key < keys:
                raise ValueError(f"pitch {pitch} at step {t} is off the piano (MIDI {low}-{low + keys - 1})")
            roll[t, key] = 1.0
    return roll


def load_jsb_chorales(root: str | Path = "data", download: bool = False) -> SequenceDataset:
    """The JSB chorales piano rolls (88 binary keys per step), padded and masked per split.

    Reads ``<root>/jsb_chorales/JSB Chorales.pickle`` (a dict with "train", "valid" and "test",
    each a list of chorales, each a list of time steps, each a tuple of MIDI pitches); with
    ``download=True`` a missing file is fetched from the authors' page first.
    """
    path = Path(root).expanduser() / JSB_FOLDER / JSB_FILE
    if not path.exists():
        if not download:
            raise FileNotFoundError(f"JSB chorales not found at {path}; pass download=True to fetch "
                                    f"{JSB_URL}, or point root at a folder that has {JSB_FOLDER}/{JSB_FILE}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        urllib.request.urlretrieve(JSB_URL, tmp)
        tmp.replace(path)
    with path.open("rb") as handle:
        raw = _PlainDataUnpickler(handle, encoding="latin1").load()
    if not isinstance(raw, dict) or not all(s in raw for s in SPLITS):
        raise ValueError(f"{path}: expected a dict with keys {SPLITS}")
    splits = {}
    for name in SPLITS:
        chorales = [piano_roll(c) for c in raw[name] if len(c) > 0]
        x, mask = pad_sequences(chorales)
        splits[name] = {"x": x, "mask": mask}
    return SequenceDataset("jsb", **splits, x_dim=PIANO_KEYS)


def load_sequence_dataset(name: str, root: str | Path = "data", download: bool = False,
                          seed: int = 0) -> SequenceDataset:
    """One of :data:`SEQUENCE_DATASETS` (``nile``: its one series in every split)."""
    if name == "linear-gaussian":
        return linear_gaussian_dataset(seed=seed)
    if name == "pendulum":
        return pendulum_dataset(seed=seed)
    if name == "jsb":
        return load_jsb_chorales(root, download)
    if name == "nile":
        return nile_dataset()
    raise ValueError(f"unknown sequence dataset {name!r}; valid choices: {', '.join(SEQUENCE_DATASETS)}")
