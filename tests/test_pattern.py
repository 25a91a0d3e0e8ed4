import pytest
import torch

from frod_kernels.pattern import SparsePattern, check_pattern, num_sparse_entries, sample_sparse_pattern


@pytest.mark.parametrize("n,rate", [(1, 0.5), (7, 0.3), (64, 0.01), (97, 0.02), (40, 0.99)])
def test_pattern_is_offdiagonal_sorted_unique(n, rate):
    idx = sample_sparse_pattern(n, rate, seed=3)
    assert idx.dtype == torch.int64 and idx.shape == (2, num_sparse_entries(n, rate))
    check_pattern(idx, n)  # off-diagonal, in range, strictly increasing row-major
    assert idx.shape[1] == min(int(rate * n * n + 1e-9), n * (n - 1))


def test_pattern_deterministic_and_seed_dependent():
    a = sample_sparse_pattern(300, 0.01, seed=7)
    assert torch.equal(a, sample_sparse_pattern(300, 0.01, seed=7))
    assert not torch.equal(a, sample_sparse_pattern(300, 0.01, seed=8))


def test_pattern_large_n_uses_rejection_and_stays_uniformish():
    # n(n-1) > 2**22 takes the no-permutation route; rows must be spread over the whole range.
    n = 3000
    idx = sample_sparse_pattern(n, 0.001, seed=1)
    check_pattern(idx, n)
    counts = torch.bincount(idx[0], minlength=n).double()
    assert counts.mean().item() == pytest.approx(idx.shape[1] / n)
    assert counts.std().item() < 3 * counts.mean().sqrt().item()
    assert torch.equal(idx, sample_sparse_pattern(n, 0.001, seed=1))


def test_pattern_known_values_are_stable():
    # Guards "same pattern on any machine": a change of sampling algorithm would break old adapters.
    assert sample_sparse_pattern(6, 0.2, seed=0).tolist() == [[1, 2, 2, 4, 5, 5, 5], [5, 4, 5, 3, 0, 2, 4]]
    assert sample_sparse_pattern(3000, 0.001, seed=1)[:, :4].tolist() == [[0, 0, 0, 2], [10, 962, 1850, 122]]


def test_k_formula_matches_frod_md():
    # docs/design.md §7: CLIP ViT-B/32, q,k,v,out (768x768), fc1 (n=768), fc2 (n=3072), 12 layers, ρ = 0.01.
    per_layer = {768: 768 + num_sparse_entries(768, 0.01), 3072: 3072 + num_sparse_entries(3072, 0.01)}
    assert per_layer[768] == 6666
    assert 12 * (5 * per_layer[768] + per_layer[3072]) == 1_569_276


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
def test_bad_sparse_rate(rate):
    with pytest.raises(ValueError, match="sparse_rate"):
        sample_sparse_pattern(10, rate)


def test_zero_rate_gives_empty_pattern():
    idx = sample_sparse_pattern(10, 0.0)
    assert idx.shape == (2, 0)
    p = SparsePattern.from_indices(idx, 10)
    assert p.k == 0 and p.csr_ptr.tolist() == [0] * 11


def test_csr_csc_views():
    n = 23
    idx = sample_sparse_pattern(n, 0.2, seed=5)
    p = SparsePattern.from_indices(idx, n)
    rows, cols = idx
    for r in range(n):
        seg = slice(p.csr_ptr[r], p.csr_ptr[r + 1])
        assert (rows[seg] == r).all()
    for c in range(n):
        ent = p.csc_perm[p.csc_ptr[c]:p.csc_ptr[c + 1]]
        assert (cols[ent] == c).all() and (rows[ent].diff() > 0).all()
    assert sorted(p.csc_perm.tolist()) == list(range(p.k))


@pytest.mark.parametrize(
    "indices,match",
    [
        (torch.tensor([[0, 1], [1, 1]]), "off-diagonal"),
        (torch.tensor([[0, 0], [1, 1]]), "sorted"),
        (torch.tensor([[1, 0], [0, 1]]), "sorted"),
        (torch.tensor([[0], [9]]), "out of range"),
        (torch.tensor([[0], [1]], dtype=torch.int32), "int64"),
        (torch.tensor([0, 1]), "shape"),
    ],
)
def test_bad_patterns(indices, match):
    with pytest.raises(ValueError, match=match):
        check_pattern(indices, 5)
