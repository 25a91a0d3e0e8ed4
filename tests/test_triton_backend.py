"""The Triton primitives against dense float64 maths and against ``torch_backend``.

Without a GPU the kernels run under Triton's interpreter (``conftest`` sets TRITON_INTERPRET), so
shapes are small but odd (1, primes, sizes just past a block) and inputs come in several layouts:
contiguous, transposed views and step-sliced views with a storage offset.

Errors are bounded the way rounding errors of dot products are: |got − exact| ≤ tol · Σ|terms|,
where Σ|terms| is the same sum computed over absolute values. This stays tight when entries
cancel, unlike a bound relative to |exact|.
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

import torch

from frod_kernels.backends import torch_backend, triton_backend
from frod_kernels.pattern import SparsePattern, sample_sparse_pattern

if not triton_backend.is_available():
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() and not triton_backend._INTERPRET else "cpu"
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _matrix(rows: int, cols: int, layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random (rows, cols) tensor: "c" contiguous, "t" a transposed view, "s" a step-sliced view."""
    if layout == "c":
        x = torch.randn(rows, cols, generator=gen, dtype=dtype)
    elif layout == "t":
        x = torch.randn(cols, rows, generator=gen, dtype=dtype).t()
    else:
        x = torch.randn(2 * rows + 1, 3 * cols, generator=gen, dtype=dtype)[1::2, ::3]
    return x.to(DEVICE)


def _vector(size: int, layout: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random (size,) tensor, contiguous ("c") or a step-sliced view with an offset (otherwise)."""
    if layout == "c":
        return torch.randn(size, generator=gen, dtype=dtype).to(DEVICE)
    return torch.randn(3 * size + 1, generator=gen, dtype=dtype)[1::3].to(DEVICE)


def _pattern(n: int, rate: float, seed: int) -> SparsePattern:
    return SparsePattern.from_indices(sample_sparse_pattern(n, rate, seed).to(DEVICE), n)


def _dense_m(diag: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """M = diag(diag) + S in float64."""
    m = torch.diag(diag.double())
    m[pattern.indices[0], pattern.indices[1]] += values.double()
    return m


def _check(
    got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, slack: float = 1.0
) -> None:
    """got has the expected dtype and shape, and |got − exact| ≤ slack · tol · scale elementwise."""
    assert got.dtype == dtype and got.shape == exact.shape and got.device.type == exact.device.type
    err = (got.double() - exact).abs()
    bound = slack * TOL[dtype] * scale
    assert bool((err <= bound).all()), f"max error / bound = {(err / bound).max().item():.3g}"


def _check_both(got, want_torch, exact, scale, dtype):
    """Against exact dense maths, and against torch_backend (which carries its own rounding)."""
    _check(got, exact, scale, dtype)
    _check(got, want_torch.double(), scale, dtype, slack=2.0)


# (R, C, K1, K2 or None, has_bias, layouts of a1, b1, a2, b2, bias)
DUAL_CASES = [
    (1, 1, 1, None, False, "ccccc"),
    (7, 5, 33, 70, True, "ttscs"),
    (37, 70, 5, 1, False, "sctsc"),
    (70, 33, 67, None, True, "ctccc"),
    (67, 37, 70, 33, True, "tttts"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DUAL_CASES)
def test_dual_matmul(case, dtype):
    R, C, K1, K2, has_bias, layouts = case
    gen = _gen(R * 1000 + C)
    a1 = _matrix(R, K1, layouts[0], dtype, gen)
    b1 = _matrix(C, K1, layouts[1], dtype, gen)
    a2 = b2 = bias = None
    exact = a1.double() @ b1.double().t()
    scale = a1.double().abs() @ b1.double().abs().t()
    if K2 is not None:
        a2 = _matrix(R, K2, layouts[2], dtype, gen)
        b2 = _matrix(C, K2, layouts[3], dtype, gen)
        exact += a2.double() @ b2.double().t()
        scale += a2.double().abs() @ b2.double().abs().t()
    if has_bias:
        bias = _vector(C, layouts[4], dtype, gen)
        exact += bias.double()
        scale += bias.double().abs()
    got = triton_backend.dual_matmul(a1, b1, a2, b2, bias)
    _check_both(got, torch_backend.dual_matmul(a1, b1, a2, b2, bias), exact, scale, dtype)


def test_dual_matmul_empty_dimensions():
    gen = _gen(0)
    a, b = _matrix(5, 3, "c", torch.float64, gen), _matrix(4, 3, "c", torch.float64, gen)
    assert triton_backend.dual_matmul(a[:0], b).shape == (0, 4)
    assert triton_backend.dual_matmul(a, b[:0]).shape == (5, 0)
    # K1 = 0: only the second product and the bias remain.
    bias = _vector(4, "c", torch.float64, gen)
    got = triton_backend.dual_matmul(a[:, :0], b[:, :0], a, b, bias)
    torch.testing.assert_close(got, a @ b.t() + bias, rtol=1e-12, atol=1e-12)


_NEW_TF32_API = pytest.mark.skipif(
    not hasattr(torch.backends, "fp32_precision"), reason="torch < 2.9 has only the legacy TF32 API"
)


@pytest.fixture
def tf32_state():
    """Restore PyTorch's float32 matmul precision, whichever API a test set it with."""
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision, torch.backends.fp32_precision
    yield matmul
    # Back through the new API: "none" defers to the generic setting, as at start-up.
    matmul.fp32_precision, torch.backends.fp32_precision = before


@_NEW_TF32_API
def test_input_precision_follows_the_legacy_tf32_api(tf32_state):
    tf32_state.allow_tf32 = False
    assert triton_backend.input_precision(torch.float32) == "ieee"
    tf32_state.allow_tf32 = True
    assert triton_backend.input_precision(torch.float32) == "tf32"
    assert triton_backend.input_precision(torch.float64) == "ieee"
    torch.set_float32_matmul_precision("highest")
    assert triton_backend.input_precision(torch.float32) == "ieee"
    torch.set_float32_matmul_precision("high")
    assert triton_backend.input_precision(torch.float32) == "tf32"


@_NEW_TF32_API
def test_input_precision_follows_the_new_tf32_api(tf32_state):
    """torch ≥ 2.9: after the new API is used, reading the legacy allow_tf32 raises; the backend
    must not read it (and must still follow the setting, including the generic fallback)."""
    tf32_state.fp32_precision = "tf32"
    assert triton_backend.input_precision(torch.float32) == "tf32"
    tf32_state.fp32_precision = "ieee"
    assert triton_backend.input_precision(torch.float32) == "ieee"
    tf32_state.fp32_precision = "none"  # defer to torch.backends.fp32_precision
    torch.backends.fp32_precision = "tf32"
    assert triton_backend.input_precision(torch.float32) == "tf32"
    torch.backends.fp32_precision = "ieee"
    assert triton_backend.input_precision(torch.float32) == "ieee"
    assert triton_backend.input_precision(torch.bfloat16) == "ieee"  # TF32 is an fp32 matter


_NEW_API_SCRIPT = """
import torch
torch.backends.cuda.matmul.fp32_precision = "tf32"
try:
    torch.backends.cuda.matmul.allow_tf32
    print("legacy read allowed")
except RuntimeError as exc:
    print("legacy read raises:", "legacy and new" in str(exc))
from frod_kernels.backends import triton_backend
a = torch.randn(9, 7)
out = triton_backend.dual_matmul(a, a, a, a)
print("precision", triton_backend.input_precision(torch.float32), tuple(out.shape))
"""


@_NEW_TF32_API
def test_new_tf32_api_in_a_fresh_process():
    """The torch 2.13 trap, as a user meets it: the new API set first thing in a fresh process,
    where reading the legacy flag raises; an fp32 dual_matmul must still run, on TF32."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", _NEW_API_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # (torch 2.13 prints "legacy read raises: True": the trap is live there.)
    assert "precision tf32 (9, 9)" in done.stdout, done.stdout


@_NEW_TF32_API
@pytest.mark.parametrize("api", ["legacy", "new"])
def test_float32_dual_matmul_runs_under_either_tf32_api(tf32_state, api):
    gen = _gen(3)
    a1, b1 = _matrix(37, 33, "t", torch.float32, gen), _matrix(70, 33, "c", torch.float32, gen)
    a2, b2 = _matrix(37, 5, "c", torch.float32, gen), _matrix(70, 5, "s", torch.float32, gen)
    if api == "new":
        tf32_state.fp32_precision = "tf32"
    else:
        tf32_state.allow_tf32 = True
    got = triton_backend.dual_matmul(a1, b1, a2, b2)
    exact = a1.double() @ b1.double().t() + a2.double() @ b2.double().t()
    scale = a1.double().abs() @ b1.double().abs().t() + a2.double().abs() @ b2.double().abs().t()
    # TF32 rounds each operand to 10 mantissa bits: 2·2⁻¹¹ per product term, plus fp32 accumulation.
    _check(got, exact, scale, torch.float32, slack=1e-3 / TOL[torch.float32])


def test_dual_matmul_alignment_picks_the_config_list(monkeypatch):
    """ALIGNED (every base address and non-unit stride divisible by 16) is what the launcher
    passes, and it selects the list for unaligned operands otherwise."""
    seen = []
    real = triton_backend._launch
    monkeypatch.setattr(
        triton_backend, "_launch", lambda k, g, *a, **kw: seen.append(kw["ALIGNED"]) or real(k, g, *a, **kw)
    )
    a = torch.randn(64, 32, device=DEVICE)
    triton_backend.dual_matmul(a, a)
    triton_backend.dual_matmul(a[:, 1:], a[:, 1:])  # base address 4 bytes past an aligned one
    triton_backend.dual_matmul(a[:33].t(), a[:33].t())  # stride 32 and 1: still aligned
    triton_backend.dual_matmul(torch.randn(33, 17, device=DEVICE), a[:, :17])  # stride 17
    assert seen == [True, False, True, False]
    # What a GPU launch would offer (the interpreter always offers its single small config).
    monkeypatch.setattr(triton_backend, "_INTERPRET", False)
    configs = triton_backend.dual_matmul_configs
    aligned, unaligned = triton_backend._DUAL_TABLE, triton_backend._DUAL_TABLE_UNALIGNED
    assert configs(torch.float16, "ieee", (9, 0), True) is aligned["16bit", "sm90"]
    assert configs(torch.bfloat16, "ieee", (8, 0), False) is unaligned["16bit", "sm80"]
    assert configs(torch.float32, "tf32", (9, 0), False) is unaligned["tf32", "sm90"]
    assert configs(torch.float32, "ieee", (8, 0), True) is aligned["fp32", "sm80"]
    assert configs(torch.float64, "ieee", (10, 0), True) is aligned["fp64", "sm90"]
    small = configs(torch.float16, "ieee", (8, 9), True)  # sm80's list, minus what exceeds 99 KiB
    assert small and set(map(str, small)) <= set(map(str, aligned["16bit", "sm80"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_dual_matmul_wide_offsets(monkeypatch, dtype):
    """The int64 in-tile offsets (WIDE), taken for huge strides, give the same numbers."""
    monkeypatch.setattr(triton_backend, "_WIDE_STRIDE", 1)
    seen = []
    real = triton_backend._launch
    monkeypatch.setattr(
        triton_backend, "_launch", lambda k, g, *a, **kw: seen.append(kw["WIDE"]) or real(k, g, *a, **kw)
    )
    gen = _gen(5)
    a1, b1 = _matrix(37, 40, "s", dtype, gen), _matrix(33, 40, "t", dtype, gen)
    bias = _vector(33, "s", dtype, gen)
    got = triton_backend.dual_matmul(a1, b1, bias=bias)
    assert seen == [True]
    exact = a1.double() @ b1.double().t() + bias.double()
    scale = a1.double().abs() @ b1.double().abs().t() + bias.double().abs()
    _check_both(got, torch_backend.dual_matmul(a1, b1, bias=bias), exact, scale, dtype)


def test_configs_offered_per_dtype_and_gpu():
    """Each dtype family and GPU generation has its own list; under the interpreter, one config."""
    assert len(triton_backend.dual_matmul_configs(torch.float32, "ieee", (9, 0))) == 1
    tables = triton_backend._DUAL_TABLE, triton_backend._DUAL_TABLE_UNALIGNED
    for table in tables:
        assert set(table) == {(f, t) for f in ("16bit", "tf32", "fp32", "fp64") for t in ("sm90", "sm80")}
    assert triton_backend.gpu_tier((9, 0)) == "sm90" and triton_backend.gpu_tier((8, 0)) == "sm80"
    assert triton_backend.gpu_tier((8, 9)) == triton_backend.gpu_tier((12, 0)) == "small"
    for (family, tier), configs in [*tables[0].items(), *tables[1].items()]:
        element = {"16bit": 2, "tf32": 4, "fp32": 4, "fp64": 8}[family]
        for c in configs:
            # A and B tiles of every pipeline stage fit the tier's shared memory (the AOT test
            # measures the real figure; this is the floor it cannot be below).
            tiles = c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * element
            assert tiles <= triton_backend.SHARED_MEMORY_LIMIT[tier], (family, tier, c)


# (n, R, sparse_rate, layout of b; diag and values are step-sliced unless b is contiguous)
M_CASES = [
    (1, 5, 0.3, "c"),  # n = 1 has no off-diagonal slot: k = 0
    (7, 1, 0.3, "t"),
    (37, 33, 0.05, "s"),
    (37, 70, 0.3, "t"),
    (67, 33, 0.05, "c"),
    (67, 5, 0.0, "s"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("case", M_CASES)
def test_m_matmul(case, transpose, dtype):
    n, R, rate, layout = case
    gen = _gen(n * 100 + R)
    pattern = _pattern(n, rate, seed=n)
    b = _matrix(n, R, layout, dtype, gen)
    diag = _vector(n, layout, dtype, gen)
    values = _vector(pattern.k, layout, dtype, gen)
    m = _dense_m(diag, values, pattern)
    if transpose:
        m = m.t()
    got = triton_backend.m_matmul(b, diag, values, pattern, transpose)
    assert got.is_contiguous()
    want = torch_backend.m_matmul(b, diag, values, pattern, transpose)
    _check_both(got, want, m @ b.double(), m.abs() @ b.double().abs(), dtype)


def test_m_matmul_no_columns():
    pattern = _pattern(7, 0.3, seed=0)
    b = torch.empty(7, 0, dtype=torch.float32, device=DEVICE)
    values = torch.ones(pattern.k, device=DEVICE)
    for transpose in (False, True):
        got = triton_backend.m_matmul(b, torch.ones(7, device=DEVICE), values, pattern, transpose)
        assert got.shape == (7, 0) and got.dtype == torch.float32


# (n, T, sparse_rate, layouts of at and bt)
SDDMM_CASES = [
    (1, 1, 0.3, "cc"),
    (7, 70, 0.3, "ts"),
    (37, 33, 0.05, "st"),
    (67, 5, 0.3, "ct"),
    (67, 37, 0.0, "tc"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SDDMM_CASES)
def test_sddmm(case, dtype):
    n, T, rate, layouts = case
    gen = _gen(n * 100 + T)
    pattern = _pattern(n, rate, seed=n + 1)
    at = _matrix(n, T, layouts[0], dtype, gen)
    bt = _matrix(n, T, layouts[1], dtype, gen)
    exact = at.double() @ bt.double().t()
    scale = at.double().abs() @ bt.double().abs().t()
    rows, cols = pattern.indices
    got_diag, got_vals = triton_backend.sddmm(at, bt, pattern)
    want_diag, want_vals = torch_backend.sddmm(at, bt, pattern)
    _check_both(got_diag, want_diag, exact.diagonal(), scale.diagonal(), dtype)
    _check_both(got_vals, want_vals, exact[rows, cols], scale[rows, cols], dtype)


def test_sddmm_no_columns():
    pattern = _pattern(7, 0.3, seed=0)
    at = torch.empty(7, 0, dtype=torch.float64, device=DEVICE)
    got_diag, got_vals = triton_backend.sddmm(at, at, pattern)
    assert got_diag.shape == (7,) and got_vals.shape == (pattern.k,)
    assert got_diag.dtype == got_vals.dtype == torch.float64
    assert not got_diag.any() and not got_vals.any()
