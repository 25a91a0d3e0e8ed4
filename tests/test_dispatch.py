import pytest
import torch

from frod_kernels import dispatch, ops
from frod_kernels.dispatch import choose_backend, choose_path, path_costs


def _shape(n_rows, d=1024, **kw):
    return dict(n_rows=n_rows, out_features=d, in_features=d, k=int(0.01 * d * d), **kw)


def test_token_path_for_few_rows_weight_path_for_many():
    assert choose_path("auto", **_shape(64)) == "token"
    assert choose_path("auto", **_shape(256)) == "token"
    assert choose_path("auto", **_shape(4096)) == "weight"
    assert choose_path("auto", **_shape(16384, device_type="cuda")) == "weight"


def test_crossover_is_near_d_as_frod_md_says():
    d = 1024
    crossover = next(n for n in range(16, 8 * d, 16) if choose_path("auto", **_shape(n, d)) == "weight")
    assert d / 4 < crossover < 2 * d


def test_inference_prefers_weight_path_later():
    # Without gradients the weight path's extra o·n·n (H = UᵀG) disappears but so does the token
    # path's backward: both shrink, and the forced choice is still honoured.
    train = path_costs(**_shape(512))
    infer = path_costs(**_shape(512, needs_input_grad=False, needs_param_grad=False))
    assert infer["token"] < train["token"] and infer["weight"] < train["weight"]
    for forced in ("token", "weight"):
        assert choose_path(forced, **_shape(512)) == forced


def test_backend_choice():
    assert choose_backend("auto", torch.device("cpu")) == "torch"
    assert choose_backend("torch", torch.device("cpu")) == "torch"
    # The test session runs Triton under the interpreter (conftest), so forcing it works on CPU...
    assert choose_backend("triton", torch.device("cpu")) == "triton"
    # ...but it is never picked automatically there, and it cannot run on other devices.
    with pytest.raises(RuntimeError, match="triton"):
        choose_backend("triton", torch.device("meta"))
    with pytest.raises(ValueError, match="backend"):
        choose_backend("cuda", torch.device("cpu"))


def test_frod_linear_uses_the_dispatched_path(monkeypatch):
    """The path the cost model picks is the one the op runs (seen through the saved tensor)."""
    seen = []
    real = ops.frod_linear_call

    def spy(*args):
        seen.append(args[-3])
        return real(*args)

    monkeypatch.setattr(ops, "frod_linear_call", spy)
    from frod_kernels import frod_linear
    from frod_kernels.pattern import sample_sparse_pattern

    n = 64
    idx = sample_sparse_pattern(n, 0.01, 0)
    w, u, v = torch.randn(n, n), torch.randn(n, n), torch.randn(n, n)
    delta = torch.zeros(n, requires_grad=True)
    values = torch.zeros(idx.shape[1], requires_grad=True)
    for rows in (8, 4096):
        frod_linear(torch.randn(rows, n), w, None, u, v, delta, idx, values)
    assert seen == [
        choose_path("auto", **_shape(8, n, needs_input_grad=False)),
        choose_path("auto", **_shape(4096, n, needs_input_grad=False)),
    ] == ["token", "weight"]
    assert dispatch.PATHS == ("auto", "token", "weight", "basis")


# --------------------------------------------------------------------------------------------
# Per-primitive backends under backend="triton" and the first-use self-check
# --------------------------------------------------------------------------------------------

CUDA, CPU = torch.device("cuda"), torch.device("cpu")
_needs_triton = pytest.mark.skipif(not dispatch._triton_usable(CPU), reason="needs Triton (interpreter on CPU)")


@pytest.fixture
def clean_routing(monkeypatch):
    """No overrides from the environment or earlier tests, and a fresh self-check state."""
    from frod_kernels.backends import self_check

    monkeypatch.delenv("FROD_PRIMITIVE_BACKENDS", raising=False)
    monkeypatch.setattr(dispatch, "_primitive_overrides", {})
    self_check.reset()
    yield
    self_check.reset()


def test_cuda_runs_single_gemms_on_torch_and_fused_primitives_on_triton(clean_routing):
    assert {p: dispatch.primitive_backend(p, CUDA) for p in dispatch.PRIMITIVES} == {
        "gemm": "torch", "dual_gemm": "triton", "m_matmul": "triton", "sddmm": "triton"
    }
    # The interpreter exists to test the kernels: everything on Triton there.
    assert {dispatch.primitive_backend(p, CPU) for p in dispatch.PRIMITIVES} == {"triton"}


def test_primitive_overrides(clean_routing, monkeypatch):
    monkeypatch.setenv("FROD_PRIMITIVE_BACKENDS", "gemm=triton, sddmm=torch")
    assert dispatch.primitive_backend("gemm", CUDA) == "triton"
    assert dispatch.primitive_backend("sddmm", CPU) == "torch"
    assert dispatch.primitive_backend("m_matmul", CUDA) == "triton"
    # The function wins over the variable, and None restores the default.
    assert dispatch.set_primitive_backend("gemm", "torch") is None
    assert dispatch.primitive_backend("gemm", CUDA) == "torch"
    assert dispatch.primitive_backend("gemm", CPU) == "torch"
    assert dispatch.set_primitive_backend("gemm", None) == "torch"
    monkeypatch.delenv("FROD_PRIMITIVE_BACKENDS")
    assert dispatch.primitive_backend("gemm", CPU) == "triton"
    with pytest.raises(ValueError, match="primitive"):
        dispatch.set_primitive_backend("matmul", "torch")
    with pytest.raises(ValueError, match="backend"):
        dispatch.set_primitive_backend("gemm", "cublas")
    monkeypatch.setenv("FROD_PRIMITIVE_BACKENDS", "gemm")
    with pytest.raises(ValueError, match="primitive=backend"):
        dispatch.primitive_backend("gemm", CUDA)


def _spy_backends(monkeypatch):
    """Record the layer's primitive calls as (backend, primitive) pairs (the self-check's own
    calls are left out)."""
    from frod_kernels.backends import self_check, torch_backend, triton_backend

    calls, checking = [], []
    real_check = self_check._check

    def check(*args):
        checking.append(True)
        try:
            return real_check(*args)
        finally:
            checking.pop()

    monkeypatch.setattr(self_check, "_check", check)
    for name, module in (("torch", torch_backend), ("triton", triton_backend)):
        for fn_name in ("dual_matmul", "m_matmul", "sddmm"):
            real = getattr(module, fn_name)

            def spy(*args, _real=real, _name=name, _fn=fn_name, **kwargs):
                second = (len(args) > 2 and args[2] is not None) or kwargs.get("a2") is not None
                if not checking:
                    calls.append((_name, {"dual_matmul": "dual_gemm" if second else "gemm"}.get(_fn, _fn)))
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, fn_name, spy)
    return calls


def _problem_grads(backend, path, seed=0):
    from frod_kernels import frod_linear

    from _problems import make_problem

    p = make_problem((9,), 12, 16, dtype=torch.float64, seed=seed)
    y = frod_linear(p.x, p.weight, p.bias, p.U, p.V, p.delta, p.indices, p.values, backend=backend, path=path)
    grads = torch.autograd.grad(y.square().sum(), (p.x, p.delta, p.values))
    return (y.detach(), *grads)


@_needs_triton
@pytest.mark.parametrize("path", ["token", "weight"])
def test_routed_backend_follows_the_cuda_choice(clean_routing, monkeypatch, path):
    """With CPU given CUDA's table, every product of a layer call goes where the table says, and
    the numbers are the PyTorch backend's."""
    monkeypatch.setitem(dispatch._DEFAULT_PRIMITIVE_BACKENDS, "cpu", dispatch._DEFAULT_PRIMITIVE_BACKENDS["cuda"])
    want = _problem_grads("torch", path)
    calls = _spy_backends(monkeypatch)
    got = _problem_grads("triton", path)
    table = dispatch._DEFAULT_PRIMITIVE_BACKENDS["cuda"]
    assert calls and all(backend == table[primitive] for backend, primitive in calls), calls
    ran = {primitive for _, primitive in calls}
    # The token path has both products and the fused ones; the weight path is single GEMMs + sparse.
    assert ran == ({"gemm", "dual_gemm", "m_matmul", "sddmm"} if path == "token" else {"gemm", "m_matmul", "sddmm"})
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def _break(monkeypatch, how):
    from frod_kernels.backends import triton_backend

    if how == "error":
        def broken(*args, **kwargs):
            raise RuntimeError("ptxas exploded")
    else:
        real = triton_backend.sddmm

        def broken(*args, **kwargs):
            diag, vals = real(*args, **kwargs)
            return diag, vals * 1.001  # off by far more than float64's rounding
    monkeypatch.setattr(triton_backend, "sddmm", broken)


@_needs_triton
@pytest.mark.parametrize("how", ["error", "mismatch"])
def test_self_check_falls_back_to_torch_once(clean_routing, monkeypatch, how):
    import warnings

    from frod_kernels.backends import self_check

    monkeypatch.setattr(self_check, "CHECKED_DEVICE_TYPES", {"cpu"})
    want = _problem_grads("torch", "token")
    _break(monkeypatch, how)
    calls = _spy_backends(monkeypatch)
    with pytest.warns(RuntimeWarning, match=r"self-check on cpu.*frod-kernels --device cpu") as record:
        got = _problem_grads("triton", "token")
    assert len([w for w in record if "self-check" in str(w.message)]) == 1
    # Every primitive of the call ran on PyTorch, and the results are PyTorch's.
    assert calls and {backend for backend, _ in calls} == {"torch"}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # The device stays on PyTorch, for other dtypes too, and there is no second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _problem_grads("triton", "weight", seed=1)
        from frod_kernels.backends import triton_backend

        a = torch.randn(5, 4, dtype=torch.float32)
        dispatch.get_backend("triton").dual_matmul(a, a)
    assert {backend for backend, _ in calls} == {"torch"}
    assert not self_check.triton_ok(CPU, torch.float32)
    assert triton_backend.is_available()


@_needs_triton
def test_self_check_passes_on_working_kernels(clean_routing, monkeypatch):
    import warnings

    from frod_kernels.backends import self_check

    monkeypatch.setattr(self_check, "CHECKED_DEVICE_TYPES", {"cpu"})
    checks = []
    real_check = self_check._check
    monkeypatch.setattr(self_check, "_check", lambda *a: checks.append(a) or real_check(*a))
    calls = _spy_backends(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _problem_grads("triton", "token")
        _problem_grads("triton", "weight")
    assert checks == [(CPU, torch.float64)]  # once per device and dtype
    assert calls and {backend for backend, _ in calls} == {"triton"}
    assert self_check.triton_ok(CPU, torch.float64)
    # The float32 and float16 bounds hold for correct kernels too (bf16 cannot be checked here:
    # the interpreter's tl.dot is wrong for bf16, and the self-check does catch that).
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert self_check.triton_ok(CPU, torch.float32)
        assert self_check.triton_ok(CPU, torch.float16)
    # TF32 runs other float32 kernels: switching it on asks for a check of its own.
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(torch.backends, "fp32_precision")  # torch ≥ 2.9
    before = matmul.fp32_precision if new_api else matmul.allow_tf32
    try:
        if new_api:
            matmul.fp32_precision = "tf32"
        else:
            matmul.allow_tf32 = True
        assert self_check.triton_ok(CPU, torch.float32)
    finally:
        if new_api:
            matmul.fp32_precision = before
        else:
            matmul.allow_tf32 = before
    assert [c[1] for c in checks] == [torch.float64, torch.float32, torch.float16, torch.float32]
