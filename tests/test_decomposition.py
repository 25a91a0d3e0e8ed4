import hashlib
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from frod_kernels import FRoDLinear, fingerprint, joint_decompose
from frod_kernels.decomposition import (
    _gram,
    _mean_regularised_inverse,
    _mean_regularised_inverse_of_grams,
    check_weights,
    shared_stack,
)
from frod_kernels.fingerprint import fingerprints_by_dtype
from frod_kernels.functional import frod_linear
from frod_kernels.layer_state import basis_path_error
from frod_kernels.pattern import SparsePattern, sample_sparse_pattern
from frod_kernels.reference import error_tolerance, relative_error


def _weights(L, o, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o, n, generator=g, dtype=dtype) / n**0.5 for _ in range(L)]


def _reconstruct(basis, i):
    return (basis.U[i].double() * basis.lam[i].double()) @ basis.V.double().mT


@pytest.mark.parametrize("L,o,n", [(4, 24, 24), (3, 40, 17), (5, 9, 31), (2, 31, 31)])
def test_reconstruction_and_invariants(L, o, n):
    ws = _weights(L, o, n)
    b = joint_decompose(ws)
    assert len(b) == L and b.V.shape == (n, n) and b.jitter == 0.0
    for i, w in enumerate(ws):
        err = float(torch.linalg.norm(_reconstruct(b, i) - w) / torch.linalg.norm(w))
        assert err < 1e-10 and b.errors[i] < 1e-10
        assert err / 4 < b.errors[i] < 4 * err  # the probe's estimate of the Frobenius ratio
        assert b.U[i].shape == (o, n)
        torch.testing.assert_close(b.U[i].norm(dim=0), torch.ones(n, dtype=torch.float64))
    # docs/design.md §7: Σ_i B_iᵀ B_i = I, hence Σ_i λ_i² = 1 for every column.
    torch.testing.assert_close(sum(lam**2 for lam in b.lam), torch.ones(n, dtype=torch.float64))
    gram_b = sum((u * lam).mT @ (u * lam) for u, lam in zip(b.U, b.lam, strict=True))
    torch.testing.assert_close(gram_b, torch.eye(n, dtype=torch.float64), atol=1e-10, rtol=0)


def test_single_layer_is_qr():
    w = _weights(1, 30, 12)[0]
    b = joint_decompose([w])
    torch.testing.assert_close(b.lam[0], torch.ones(12, dtype=torch.float64))
    torch.testing.assert_close(b.U[0].mT @ b.U[0], torch.eye(12, dtype=torch.float64))
    # V = Rᵀ with R upper triangular: V is lower triangular.
    assert torch.equal(b.V, torch.tril(b.V))
    torch.testing.assert_close(_reconstruct(b, 0), w, atol=1e-13, rtol=1e-12)


def test_error_estimate_sees_a_bad_reconstruction(monkeypatch):
    """The probe estimate is of the stored factors: a basis whose U is off by 1e-3 reports ≈ 1e-3."""
    import frod_kernels.decomposition as decomposition

    ws = _weights(3, 20, 16, seed=9)
    real_eigh = torch.linalg.eigh

    def tilted(t):  # E no longer orthogonal: U·Λ·Vᵀ = Q·E·Eᵀ·R ≠ W
        out = real_eigh(t)
        return SimpleNamespace(eigenvectors=out.eigenvectors * (1 + 1e-3 * torch.arange(t.shape[0]) / t.shape[0]))

    monkeypatch.setattr(decomposition.torch.linalg, "eigh", tilted)
    b = joint_decompose(ws)
    for i, w in enumerate(ws):
        err = float(torch.linalg.norm(_reconstruct(b, i) - w) / torch.linalg.norm(w))
        assert err > 1e-4 and err / 4 < b.errors[i] < 4 * err


@pytest.mark.parametrize("m,n", [(7, 1), (5, 3), (40, 17), (9, 64), (33, 31)])
def test_gram_is_the_full_product(m, n):
    a = torch.randn(m, n, generator=torch.Generator().manual_seed(m + n), dtype=torch.float64)
    got = _gram(a)
    assert torch.equal(got, got.mT)
    torch.testing.assert_close(got, a.mT @ a, rtol=1e-13, atol=1e-13)


def test_woodbury_branch_matches_direct_inverse():
    qs = [q for q in _weights(3, 5, 11, seed=2)]
    eye = torch.eye(11, dtype=torch.float64)
    direct = sum(torch.linalg.inv(q.mT @ q + 1e-3 * eye) for q in qs) / 3
    torch.testing.assert_close(_mean_regularised_inverse(qs, 1e-3), direct, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_gram_form_of_t_is_the_q_form(jitter):
    """T = R·[(1/L) Σ (G_i + α·RᵀR)⁻¹]·Rᵀ from G_i = W_iᵀW_i equals (1/L) Σ (Q_iᵀQ_i + αI)⁻¹ with
    Q_i = W_i·R⁻¹, also when RᵀR is the Gram sum plus a jitter (the Gram form must use RᵀR, not C)."""
    ws = _weights(4, 13, 9, seed=5)
    c = sum(w.mT @ w for w in ws) + jitter * torch.eye(9, dtype=torch.float64)
    r = torch.linalg.cholesky(c).mT
    qs = [torch.linalg.solve_triangular(r, w, upper=True, left=False) for w in ws]
    want = _mean_regularised_inverse(qs, 1e-3)
    got = _mean_regularised_inverse_of_grams([w.mT @ w for w in ws], c, r, 1e-3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize("case", ["fewer_rows_than_columns", "rank_deficient", "zero"])
def test_singular_gram_is_handled(case):
    g = torch.Generator().manual_seed(4)
    if case == "fewer_rows_than_columns":
        ws = [torch.randn(3, 20, generator=g, dtype=torch.float64) for _ in range(2)]  # L·o = 6 < n = 20
    elif case == "rank_deficient":
        ws = [torch.randn(12, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 9, generator=g, dtype=torch.float64)
              for _ in range(3)]
    else:
        ws = [torch.zeros(6, 5, dtype=torch.float64)]
    b = joint_decompose(ws)
    assert b.jitter > 0
    assert all(torch.isfinite(t).all() for t in [b.V, *b.U, *b.lam])
    assert torch.linalg.matrix_rank(b.V) == b.V.shape[0]  # V stays invertible
    for i, w in enumerate(ws):
        torch.testing.assert_close(_reconstruct(b, i), w, atol=1e-10, rtol=1e-10)
        assert b.errors[i] < 1e-10
        norms = b.U[i].norm(dim=0)
        assert torch.all(((norms - 1).abs() < 1e-12) | (norms == 0))  # unit columns, or zero ones


def test_storage_dtype_and_float32_inputs():
    ws = _weights(3, 16, 16, dtype=torch.float32)
    b = joint_decompose(ws)
    assert b.V.dtype == b.U[0].dtype == b.lam[0].dtype == torch.float32
    assert max(b.errors) < 1e-10  # the maths is float64 whatever the storage
    b64 = joint_decompose(ws, dtype=torch.float64)
    assert b64.V.dtype == torch.float64
    torch.testing.assert_close(b64.V.float(), b.V)


@pytest.mark.parametrize("L, o, n", [(3, 20, 13), (3, 13, 20), (1, 9, 7)])  # Gram form, Q form, L = 1
def test_u_comes_column_major_and_the_layer_keeps_it(L, o, n):
    """FRoDLinear keeps U column-major; the decomposition hands it over that way, so it is not copied again."""
    ws = _weights(L, o, n, dtype=torch.float32)
    b = joint_decompose(ws)
    assert all(u.shape == (o, n) and u.mT.is_contiguous() for u in b.U)
    layer = FRoDLinear.from_linear(nn.Linear(n, o).requires_grad_(False), basis=(b.U[0], b.V, b.lam[0]))
    assert layer.U.data_ptr() == b.U[0].data_ptr()
    b64 = joint_decompose([w.double() for w in ws])
    torch.testing.assert_close(b.U[0], b64.U[0].float(), rtol=0, atol=0)  # the values are the rounding of float64's


def _snapshot(b):
    return [b.V.clone(), *(u.clone() for u in b.U), *(lam.clone() for lam in b.lam), torch.tensor(b.errors),
            *([] if b.V_inv is None else [b.V_inv.clone()])]


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_shared_stack_gives_the_same_bits_and_no_result_aliases_it():
    """Inside ``shared_stack`` successive calls (Gram form, Q form, one layer, shrinking and growing
    stacks) give what they give alone, and a later call leaves the earlier results as they were."""
    cases = [(5, 48, 32, {"inverse": True}), (3, 24, 16, {}), (4, 10, 30, {"inverse": True}), (1, 12, 20, {}),
             (2, 40, 16, {})]  # the first stack is the largest: the others are views of its buffer
    alone = [_snapshot(joint_decompose(_weights(L, o, n), **kw)) for L, o, n, kw in cases]
    with shared_stack():
        results = [joint_decompose(_weights(L, o, n), **kw) for L, o, n, kw in cases]
        kept = [_snapshot(b) for b in results]
        with torch.inference_mode():  # a stack grown here is still usable outside inference mode
            joint_decompose(_weights(2, 200, 24))
        joint_decompose(_weights(2, 100, 24))
    for b, before, want in zip(results, kept, alone, strict=True):
        _assert_same(_snapshot(b), before)
        _assert_same(before, want)


def test_bad_inputs():
    ws = _weights(2, 8, 8)
    with pytest.raises(ValueError, match="at least one"):
        joint_decompose([])
    with pytest.raises(ValueError, match="shape"):
        joint_decompose([ws[0], ws[1][:, :5]])
    bad = ws[1].clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        joint_decompose([ws[0], bad])
    for reg in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="reg"):
            joint_decompose(ws, reg=reg)
    with pytest.raises(ValueError, match="floating"):
        joint_decompose([torch.ones(3, 3, dtype=torch.int64)])


# -- the decomposition's outputs are pinned to the maths: adapters record ALGORITHM_VERSION and a load --
# recomputes the basis. Only rounding may differ from the step-by-step formulation (as it does between
# thread counts and BLAS builds); a load checks the rebuilt V against the adapter's record of it.


def _straightforward_decompose(weights, reg=1e-3):
    """docs/design.md §2 step by step, one layer at a time: the formulation ALGORITHM_VERSION 1 was
    released with. The package's joint_decompose must give these U, V, λ to rounding, and errors of
    the same size."""
    dtype = weights[0].dtype
    ws = [w.to(torch.float64) for w in weights]
    peak = max(float(w.abs().max()) for w in ws)
    exponent = int(torch.frexp(torch.tensor(peak, dtype=torch.float64)).exponent) if peak > 0 else 0
    half = -exponent // 2
    ws = [w * 2.0**half * 2.0 ** (-exponent - half) for w in ws]
    gram = sum(w.mT @ w for w in ws)
    n = gram.shape[0]
    eye = torch.eye(n, dtype=torch.float64)
    scale, jitter = float(gram.diagonal().mean()) or 1.0, 0.0
    while True:
        low, info = torch.linalg.cholesky_ex(gram + jitter * eye if jitter else gram)
        if int(info) == 0 and float(low.diagonal().min()) > 1e-7 * float(low.diagonal().max()):
            break
        jitter = 1e-12 * scale if jitter == 0.0 else jitter * 100.0
    r = low.mT
    qs = [torch.linalg.solve_triangular(r, w, upper=True, left=False) for w in ws]
    o = qs[0].shape[0]
    if len(ws) == 1:
        t, e = None, eye
    else:
        if o >= n:
            t = sum(torch.cholesky_inverse(torch.linalg.cholesky(q.mT @ q + reg * eye)) for q in qs) / len(qs)
        else:
            eye_o, acc = torch.eye(o, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
            for q in qs:
                acc += q.mT @ torch.cholesky_solve(q, torch.linalg.cholesky(q @ q.mT + reg * eye_o))
            t = (eye - acc / len(qs)) / reg
        e = torch.linalg.eigh(t).eigenvectors
    v = r.mT @ e
    us, lams, errors = [], [], []
    for w, q in zip(ws, qs, strict=True):
        b = q @ e
        lam = torch.linalg.vector_norm(b, dim=0)
        u = b / torch.where(lam > 0, lam, torch.ones_like(lam))
        errors.append(float(torch.linalg.norm(w - (u * lam) @ v.mT) / torch.linalg.norm(w).clamp_min(1e-300)))
        us.append(u.to(dtype))
        lams.append(lam.to(dtype))
    v = v * 2.0 ** (exponent // 2) * 2.0 ** (exponent - exponent // 2)
    return v.to(dtype), us, lams, errors, jitter / scale, t


def _sign_unstable_columns(t, tries=20):
    """The columns of eigh(T)'s E whose sign eigh itself flips under a symmetric perturbation of T by
    1e-13 of its largest entry (rounding-sized: LAPACK's sign choice is that sensitive for some matrices)."""
    e = torch.linalg.eigh(t).eigenvectors
    g = torch.Generator().manual_seed(1)
    unstable = torch.zeros(t.shape[0], dtype=torch.bool)
    for _ in range(tries):
        p = torch.randn(t.shape, generator=g, dtype=t.dtype) * (1e-13 * float(t.abs().max()))
        unstable |= (torch.linalg.eigh(t + p + p.mT).eigenvectors * e).sum(0) < 0
    return unstable


@pytest.mark.parametrize("L,o,n,dtype,scale", [
    (4, 24, 24, torch.float64, 1.0),  # o = n: the direct inverse
    (3, 40, 17, torch.float64, 1.0),  # o > n
    (5, 9, 31, torch.float64, 1.0),  # o < n: Woodbury
    (30, 64, 48, torch.float32, 1.0),  # a category of float32 weights, both threads of BLAS at work
    (30, 16, 48, torch.float32, 1.0),
    (1, 30, 12, torch.float32, 1.0),  # one layer: E = I
    (3, 20, 16, torch.float64, 1e200),  # scaled by a power of two before and after
    (3, 20, 16, torch.float64, 1e-300),  # subnormal entries
    (4, 12, 10, torch.bfloat16, 1.0),
    (4, 10, 12, torch.float16, 1.0),
])
def test_outputs_are_the_released_formulation_to_rounding(L, o, n, dtype, scale):
    ws = [(w * scale).to(dtype) for w in _weights(L, o, n, seed=L + o + n)]
    got = joint_decompose(ws)
    V, U, lam, errors, jitter, t = _straightforward_decompose(ws)
    # float64: a few hundred ulps of the largest entry (E is resolved to ε/gap); narrower dtypes: one rounding
    tol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    # A column's sign may differ only where eigh's own sign choice is rounding-sensitive (docs/design.md §2,
    # "Versioning"; a load aligns signs to the adapter's record): a flipped stable column fails here.
    flipped = (got.V.double() * V.double()).sum(0) < 0
    assert not bool((flipped & ~_sign_unstable_columns(t)).any()) if t is not None else not bool(flipped.any())
    signs = torch.where(flipped, -1.0, 1.0).double()

    def close(a, b):
        return float((a.double() * signs - b.double()).abs().max()) <= tol * float(b.double().abs().max())

    assert close(got.V, V)
    assert all(close(a, b) for a, b in zip(got.U, U, strict=True))
    assert all(float((a.double() - b.double()).abs().max()) <= tol * float(b.double().abs().max())
               for a, b in zip(got.lam, lam, strict=True))
    assert all(e / 4 < g < 4 * e for g, e in zip(got.errors, errors, strict=True)) and got.jitter == jitter


def test_an_ill_conditioned_gram_sum_keeps_the_q_forms_accuracy():
    """o ≥ n takes T from the per-layer Gram matrices, whose rounding grows with cond(C) (an explicit R⁻¹
    forms B = W·R⁻¹·E): at cond(C) ≈ 1e10 that would give a reconstruction error near 1e-12. Such a stack
    must take the Q form (Q = W·R⁻¹ by a triangular solve) and stay at float64 rounding."""
    g = torch.Generator().manual_seed(3)
    L, o, n = 6, 40, 24
    scales = torch.logspace(0, -5, n, dtype=torch.float64)  # column scales: cond(C) ≈ 1e10
    mix = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=g))[0]
    ws = [torch.randn(o, n, dtype=torch.float64, generator=g) * scales @ mix for _ in range(L)]
    got = joint_decompose(ws)
    assert max(got.errors) < 1e-14
    V = _straightforward_decompose(ws)[0]
    assert float((got.V - V).abs().max()) <= 1e-6 * float(V.abs().max())  # E resolved to ε·cond/gap


def test_check_weights_gives_the_peak_magnitude_in_one_pass():
    ws = [torch.tensor([[0.5, -3.0]]), torch.tensor([[2.0, 1.0]])]
    assert check_weights(ws) == 3.0
    assert check_weights([w.t() for w in ws]) == 3.0  # any strides
    assert check_weights([torch.zeros(2, 2, dtype=torch.bfloat16)]) == 0.0
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.ones(3, 4, dtype=torch.float16)
        w[1, 2] = bad
        with pytest.raises(ValueError, match="weight 1 has non-finite entries"):
            check_weights([torch.ones(3, 4, dtype=torch.float16), w])


# -- fingerprints: computed in one pass now, the values adapters already record must not change ------------


def _fingerprint_weights(dtype):
    a = torch.linspace(-3, 3, 35, dtype=torch.float64).reshape(7, 5) ** 3
    return [a.to(dtype), (a.t() / 7).to(dtype), (a[:, :3] * 1e-30).to(dtype)]  # a transposed view, tiny values


def _straightforward_fingerprint(weights):
    h = hashlib.sha256()
    for w in weights:
        h.update(f"{tuple(w.shape)}:{w.dtype}:".encode())
        h.update(w.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def test_fingerprint_values_are_pinned():
    # Computed by the release that wrote adapter format 3.
    assert fingerprints_by_dtype(_fingerprint_weights(torch.float32)) == {
        "float32": "7562cf40bf3f7ef9ec2a42943758ee85", "bfloat16": "76ccf263108b491bb997154dae2688ab",
        "float16": "c043a83a4267d358c40e1717da806c7e",
    }
    assert fingerprints_by_dtype(_fingerprint_weights(torch.float64))["float64"] == "3a7943ed0816f1d71702c466121782e5"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fingerprints_match_hashing_each_cast_whole(monkeypatch, threads, dtype):
    monkeypatch.setattr(fingerprint, "_CHUNK_BYTES", 1 << 12)  # host chunks and cast steps end mid-weight
    monkeypatch.setattr(fingerprint, "_CAST_STEP", 100)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(300, 77, generator=g).to(dtype), torch.randn(77, 300, generator=g).to(dtype).t()]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # two: the rounded dtypes are hashed on a second thread
    try:
        got = fingerprints_by_dtype(ws)
    finally:
        torch.set_num_threads(previous)
    narrower = {torch.float64: (torch.float32, torch.bfloat16, torch.float16),
                torch.float32: (torch.bfloat16, torch.float16)}.get(dtype, ())
    expected = {str(d).removeprefix("torch."): _straightforward_fingerprint([w.to(d) for w in ws])
                for d in (dtype, *narrower)}
    assert got == expected
    assert fingerprint.weight_fingerprint(ws) == expected[str(dtype).removeprefix("torch.")]
    for d in narrower:  # a base loaded in a narrower dtype is recognised by its rounded fingerprint
        name = str(d).removeprefix("torch.")
        assert fingerprint.compare_fingerprints([w.to(d) for w in ws], {name: got[name]}) is None
        assert fingerprint.compare_fingerprints(ws, {name: got[name]}) is None


# -- the basis path's deviation: computed directly, it must equal the fold's measurement ----------------------


def _deviation_through_the_fold(weight, U, V, lam, pattern, dtype):
    """layer_state.basis_path_error as released: the basis path run through frod_linear's token fold."""
    x = torch.randn(64, weight.shape[1], generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    exact = x.double() @ weight.double().mT
    plain = torch.nn.functional.linear(x, weight.to(dtype))
    zeros = torch.zeros(pattern.k, dtype=dtype)
    basis = frod_linear(x, None, None, U.to(dtype), V.to(dtype), lam.to(dtype), pattern, zeros, backend="torch",
                        path="token")
    return relative_error(basis, exact), error_tolerance(relative_error(plain, exact), dtype)


@pytest.mark.parametrize("o,n,rate", [(24, 40, 0.05), (40, 24, 0.05), (17, 17, 0.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_basis_path_error_is_the_folds_measurement(o, n, rate, dtype):
    ws = _weights(3, o, n, seed=o * n, dtype=torch.float32)
    b = joint_decompose(ws)
    pattern = SparsePattern.from_indices(sample_sparse_pattern(n, rate, 0), n)
    # the layouts FRoDLinear keeps (column-major U and V) and plain row-major ones
    for U, V in ((b.U[1].t().contiguous().t(), b.V.t().contiguous().t()), (b.U[1], b.V)):
        with torch.no_grad():
            assert basis_path_error(ws[1], U, V, b.lam[1], pattern, dtype) == _deviation_through_the_fold(
                ws[1], U, V, b.lam[1], pattern, dtype)
