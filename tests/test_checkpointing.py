"""Activation checkpointing around FRoD layers (docs/hardening.md §Activation checkpointing).

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

transformers = pytest.importorskip("transformers")


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
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in fk.frod_layers(net).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g, dtype=torch.float64) * 0.1)
            layer.sparse_values.copy_(torch.randn(layer.sparse_values.shape, generator=g, dtype=torch.float64) * 0.1)
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


def _bert():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=64,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg)
    fk.apply_frod(model, ["query", "key", "value", "attention.output.dense", "intermediate.dense"], sparse_rate=0.05)
    model.classifier.requires_grad_(True)
    return model


def _train(model, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 64, (4, 12), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    opt = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=1e-2, lr_sparse=1e-2, lr_other=1e-2))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in fk.frod_state_dict(model).items()}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hf_gradient_checkpointing_trains(use_reentrant):
    plain_losses, plain_state = _train(_bert().train())
    model = _bert().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # the embeddings are frozen; see the test above
    assert model.is_gradient_checkpointing
    losses, state = _train(model)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    for name, value in plain_state.items():
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-6, msg=name)
