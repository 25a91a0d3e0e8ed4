"""Unmerged decoding at the base model's speed? Greedy ``generate`` per token: base, FRoD unmerged, merged.

    python -m benchmarks.decode_cost [--tiny] [--threads 1] [--tokens 32] [--repeats 7] [--out PATH]

A SmolLM2-135M-shaped Llama (576 hidden, 1536 intermediate, 30 layers, 9/3 heads; random weights:
the cost does not depend on their values) with FRoD on all seven projections (210 layers), δ and s
non-zero. Unmerged evaluation uses each layer's cached W' (``layer_state.WeightCache``): the product
is the base's, so the floor is 1.00× the base per token and the rest is per-call Python (the cache
key: pointers and version counters of δ, s, U, V, W). The three models run interleaved, round by
round, and the medians are compared as ratios to the base.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

import frod_kernels as fk
from frod_kernels.bench.runner import make_parser
from frod_kernels.bench.timing import Timed, machine_info, summarize, time_interleaved

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(tiny: bool) -> torch.nn.Module:
    import transformers

    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else dict(hidden_size=576, intermediate_size=1536,
                                                           num_hidden_layers=30, num_attention_heads=9,
                                                           num_key_value_heads=3)
    cfg = transformers.LlamaConfig(vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True, **shape)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def main() -> None:
    parser = make_parser("python -m benchmarks.decode_cost", __doc__)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model: a smoke run, timings mean nothing")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokens = 4 if args.tiny else args.tokens
    base = _model(args.tiny)
    unmerged = _model(args.tiny)
    fk.apply_frod(unmerged, TARGETS)
    with torch.no_grad():
        for layer in fk.frod_layers(unmerged).values():
            layer.delta.normal_(0, 1e-2)
            layer.sparse_values.normal_(0, 1e-2)
    merged = _model(args.tiny)
    fk.apply_frod(merged, TARGETS)
    merged.load_state_dict(unmerged.state_dict())
    fk.merge_frod(merged)
    prompt = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(1))

    def generate(model: torch.nn.Module) -> Timed:
        return Timed(lambda: model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                            pad_token_id=0))

    outputs = {name: m.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0)
               for name, m in (("unmerged", unmerged), ("merged", merged))}
    started = time.time()
    samples = time_interleaved({"base": generate(base), "unmerged": generate(unmerged), "merged": generate(merged)},
                               torch.device("cpu"), warmup=1, repeats=2 if args.tiny else args.repeats)
    per_token = {name: {k: v / tokens for k, v in summarize(s).items()} for name, s in samples.items()}
    result = {
        "model": "tiny Llama" if args.tiny else "SmolLM2-135M shapes", "frod_layers": len(fk.frod_layers(unmerged)),
        "tokens": tokens, "threads": args.threads, "per_token": per_token,
        "unmerged_over_base": per_token["unmerged"]["ms"] / per_token["base"]["ms"],
        "merged_over_base": per_token["merged"]["ms"] / per_token["base"]["ms"],
        "same_tokens_unmerged_merged": bool(torch.equal(outputs["unmerged"], outputs["merged"])),
        "started": started, "loadavg": [round(x, 2) for x in os.getloadavg()], "machine": machine_info(),
    }
    if args.tiny:
        print("smoke run (--tiny): a 2-layer model; its timings and ratios mean nothing")
    for name, stats in per_token.items():
        print(f"{name:>9}: {stats['ms']:.2f} ms/token (quartiles {stats['q25_ms']:.2f}-{stats['q75_ms']:.2f})")
    print(f"unmerged / base {result['unmerged_over_base']:.3f}x, merged / base {result['merged_over_base']:.3f}x; "
          f"unmerged and merged generate the same tokens: {result['same_tokens_unmerged_merged']}; "
          f"load average {result['loadavg']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
