"""Shared test fixtures: random FRoD problems with non-zero δ and s, FRoD layers, a tiny BERT."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frod_kernels import FRoDLinear, frod_layers
from frod_kernels.pattern import SparsePattern, sample_sparse_pattern


@dataclass
class Problem:
    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    delta: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def pattern(self) -> SparsePattern:
        return SparsePattern.from_indices(self.indices, self.V.shape[0])


def make_problem(
    lead: tuple[int, ...], o: int, n: int, rate: float = 0.1, dtype: torch.dtype = torch.float64, seed: int = 0,
) -> Problem:
    """Random layer and input; δ and s are non-zero and require grad, x requires grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    indices = sample_sparse_pattern(n, rate, seed)
    return Problem(
        x=rnd(*lead, n).requires_grad_(),
        weight=rnd(o, n, scale=n**-0.5),
        bias=rnd(o),
        U=rnd(o, n, scale=n**-0.5),
        V=rnd(n, n, scale=n**-0.5),
        delta=rnd(n, scale=0.5).requires_grad_(),
        indices=indices,
        values=rnd(indices.shape[1], scale=0.5).requires_grad_(),
    )


def randomise_frod(module: nn.Module, scale: float, seed: int = 1) -> None:
    """Set δ and s of every FRoD layer in ``module`` (or of ``module`` itself) to seeded N(0, scale²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in frod_layers(module).values():
            for p in (layer.delta, layer.sparse_values):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)


def frod_layer(o: int = 7, n: int = 10, *, rate: float = 0.2, seed: int = 1, dtype: torch.dtype = torch.float32,
               device: str = "cpu", **kw) -> FRoDLinear:
    """``FRoDLinear.from_linear`` (pattern ``seed``, ``kw``: mode, path, param_dtype, ...) of nn.Linear(n, o)
    drawn after ``torch.manual_seed(0)`` and moved to ``dtype`` and ``device``, with δ and s from
    ``randomise_frod(layer, 0.3)``."""
    torch.manual_seed(0)
    layer = FRoDLinear.from_linear(nn.Linear(n, o).to(device=device, dtype=dtype), sparse_rate=rate, seed=seed, **kw)
    randomise_frod(layer, 0.3)
    return layer


def tiny_bert(labels: int | None = 3, *, hidden: int = 32, layers: int = 2, intermediate: int = 48, vocab: int = 64,
              positions: int = 16, seed: int = 0) -> nn.Module:
    """A random BERT from a small config (no hub access, dropout off) drawn after ``torch.manual_seed(seed)``:
    a BertForSequenceClassification with ``labels`` classes, or the BertModel alone for None."""
    import transformers  # the tests that use it skip without it

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=intermediate,
        vocab_size=vocab, max_position_embeddings=positions, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    if labels is None:
        return transformers.BertModel(cfg)
    cfg.num_labels = labels
    return transformers.BertForSequenceClassification(cfg)
