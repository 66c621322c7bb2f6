"""training/checkpoint.py: the EMA's update rule, value by value."""

from __future__ import annotations

import torch

from training.checkpoint import EMA


def test_one_ema_update_moves_the_average_by_one_minus_decay():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen: not averaged
    old = [p.detach().clone() for p in model[0].parameters()]
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model[0].parameters():
            p.add_(1.0)  # the step moved every trainable weight by +1
    ema.update(model)
    # shadow <- decay * shadow + (1 - decay) * param = old + 0.1
    assert len(ema.shadow) == 2
    for s, o in zip(ema.shadow, old):
        torch.testing.assert_close(s, o + 0.1)
    ema.update(model)  # a second step at the same weights: old + 0.1 + 0.1 * 0.9
    for s, o in zip(ema.shadow, old):
        torch.testing.assert_close(s, o + 0.19)
    # the EMA weights go into the model only while swapped in
    with ema.swapped(model):
        torch.testing.assert_close(model[0].weight, old[0] + 0.19)
    torch.testing.assert_close(model[0].weight, old[0] + 1.0)
