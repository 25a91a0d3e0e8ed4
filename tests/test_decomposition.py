import pytest
import torch

from frod_kernels import joint_decompose
from frod_kernels.decomposition import _mean_regularised_inverse


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
        err = torch.linalg.norm(_reconstruct(b, i) - w) / torch.linalg.norm(w)
        assert err < 1e-10 and b.errors[i] < 1e-10
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


def test_woodbury_branch_matches_direct_inverse():
    qs = [q for q in _weights(3, 5, 11, seed=2)]
    eye = torch.eye(11, dtype=torch.float64)
    direct = sum(torch.linalg.inv(q.mT @ q + 1e-3 * eye) for q in qs) / 3
    torch.testing.assert_close(_mean_regularised_inverse(qs, 1e-3), direct, rtol=1e-9, atol=1e-9)


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
