"""rng_state / set_rng_state: every global generator (torch, python, numpy) and the loader's own generator
come back exactly, through a weights_only checkpoint file."""

from __future__ import annotations

import random

import numpy as np
import torch

from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state


def _draw(gen: torch.Generator) -> tuple:
    """One draw from each generator, including the cached second Gaussian of python and numpy."""
    return (
        torch.rand(4).tolist(),
        torch.randint(0, 1 << 30, (2,), generator=gen).tolist(),
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        float(np.random.standard_normal()),
    )


def test_set_rng_state_restores_every_generator(tmp_path):
    torch.manual_seed(1)
    random.seed(2)
    np.random.seed(3)
    gen = torch.Generator().manual_seed(4)
    random.gauss(0.0, 1.0)  # leaves a cached Gaussian in python's state
    np.random.standard_normal()  # and in numpy's (legacy Box-Muller pair)
    state = rng_state(gen)
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": state})
    expected = _draw(gen)

    # scramble every generator, then restore from the file (weights_only load)
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    gen.manual_seed(99)
    assert _draw(gen) != expected
    set_rng_state(load_checkpoint(path)["rng"], gen)
    got = _draw(gen)
    for name, a, b in zip(
        ("torch", "generator", "python", "python_gauss", "numpy", "numpy_gauss"), got, expected
    ):
        assert a == b, name


def test_each_generator_is_restored_on_its_own():
    """One generator moved at a time: a set_rng_state that skipped any one of them fails here."""
    gen = torch.Generator().manual_seed(0)
    state = rng_state(gen)
    moves = {
        "torch": (lambda: torch.rand(8), lambda: torch.rand(1).item()),
        "python": (lambda: [random.random() for _ in range(8)], random.random),
        "numpy": (lambda: np.random.rand(8), lambda: float(np.random.rand())),
        "generator": (
            lambda: torch.rand(8, generator=gen),
            lambda: torch.rand(1, generator=gen).item(),
        ),
    }
    for name, (move, draw) in moves.items():
        set_rng_state(state, gen)
        want = draw()
        set_rng_state(state, gen)
        move()
        set_rng_state(state, gen)
        assert draw() == want, name
