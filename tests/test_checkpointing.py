"""Activation checkpointing around FRoD layers (docs/hardening.md §4).

(A Hugging Face model with ``gradient_checkpointing_enable()`` is trained in test_hf_models.py.)

``torch.utils.checkpoint`` (reentrant and not) must give the gradients of the plain run: the
recomputed forward picks the same path and saves the same tensors, and the reentrant variant's
first forward (under no_grad, which takes the inference path) is only used for its output.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import frod_kernels as fk

from _problems import randomise_frod


class _Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down, self.norm = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(nn.functional.gelu(self.up(x))))


class _Net(nn.Module):
    def __init__(self, d: int = 24, depth: int = 3, ckpt: dict | None = None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x) if self.ckpt is None else checkpoint(block, x, **self.ckpt)
        return x


def _frod_net(mode: str, path: str) -> _Net:
    torch.manual_seed(0)
    net = _Net().double()
    fk.apply_frod(net, ["up", "down"], sparse_rate=0.05, mode=mode, path=path)
    randomise_frod(net, 0.1)
    return net


def _grads(net: _Net, x: torch.Tensor) -> dict[str, torch.Tensor]:
    net.zero_grad(set_to_none=True)
    xd = x.clone().requires_grad_()
    (net(xd) * torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)).sum().backward()
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.requires_grad}
    return {**grads, "x": xd.grad}


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("path", ["auto", "token", "weight"])
@pytest.mark.parametrize("mode", ["additive", "factored"])
def test_checkpoint_gives_the_same_gradients(mode, path, use_reentrant):
    net = _frod_net(mode, path)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    expected = _grads(net, x)
    net.ckpt = {"use_reentrant": use_reentrant}
    got = _grads(net, x)
    assert set(got) == set(expected) and len(got) == 1 + 2 * 6
    for name, g in expected.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(got[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_reentrant_checkpoint_needs_an_input_that_requires_grad():
    """The known limit of reentrant checkpointing: with a frozen input, δ and s get no gradient."""
    net = _frod_net("additive", "auto")
    net.ckpt = {"use_reentrant": True}
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        y = net(torch.randn(2, 5, 24, dtype=torch.float64))
    assert not y.requires_grad
