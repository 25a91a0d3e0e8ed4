"""Triton implementations of the FRoD primitives (same signatures and semantics as ``torch_backend``).

``dual_matmul(a1, b1, a2, b2, bias)``  → a1·b1ᵀ (+ a2·b2ᵀ) (+ bias), shape (R, C)
    a1 (R, K1), b1 (C, K1), a2 (R, K2), b2 (C, K2), bias (C,); any strides, K1 ≠ K2 allowed.
    One tiled GEMM kernel accumulates both products into the same output tile and adds the
    bias in its epilogue, so the token-space forward Y = X·Wᵀ + (X·V_M)·Uᵀ + b (docs/design.md §5)
    writes Y once.

``m_matmul(b, diag, values, pattern, transpose)`` → M·b, or Mᵀ·b if ``transpose``; shape (n, R)
    with M = diag(diag) + S, S[r_j, c_j] = values[j]; b (n, R), any strides. Cost O(R·(n+k)).
    One program per (output row, block of R columns) walks that row's nonzeros (CSR for M,
    CSC for Mᵀ), so no R × k temporary exists.

``sddmm(at, bt, pattern)`` → (C[i, i] for i < n, C[r_j, c_j] for j < k) with C = at·btᵀ;
    at, bt (n, T), any strides. One program per block of sampled entries gathers the two rows
    and reduces over T in blocks; cost O(T·(n+k)).

All kernels accumulate in float32 (float64 for float64 inputs) and write the input's dtype.
Tensors with more than 2**31 elements are addressed safely: the GEMM moves each tile's base pointer
in int64 and keeps the offsets inside a tile in int32 (the usual Triton GEMM form), switching those
to int64 too when a stride is so large that an in-tile offset could pass 2**31 (``WIDE``); the
other kernels compute offsets in int64.

Tuning: ``dual_matmul_configs(dtype, input_precision, capability)`` is the autotune list for one
dtype and GPU generation. Every config in it was compiled for sm_90 and sm_80 and fits the
target's shared memory without spilling registers (``tests/test_gpu_compile.py`` checks this in
CI, without a GPU). ``m_matmul_configs()`` and ``sddmm_configs()`` are the block shapes their
launchers can pick.

Speed notes: the kernels take any strides, but loads are coalesced along the unit-stride axis
the grids are laid out for: for ``m_matmul`` that is ``b`` row-major (unit stride along R), for
``sddmm`` ``at`` and ``bt`` row-major (unit stride along T); ``dual_matmul`` is fine with either
layout of its operands (Triton picks the shared-memory layout per tile).

Kernels are JIT-compiled for the GPU unless ``TRITON_INTERPRET=1`` was set before this module
was imported, in which case they run on CPU tensors under Triton's interpreter (slow; tests only).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from ..pattern import SparsePattern

__all__ = [
    "dual_matmul",
    "dual_matmul_configs",
    "gpu_tier",
    "input_precision",
    "is_available",
    "m_matmul",
    "m_matmul_configs",
    "sddmm",
    "sddmm_configs",
    "tf32_enabled",
]

# Read once, at definition time: ``triton.jit`` makes the same decision when the kernels below
# are defined, and the block-size choices must agree with it.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def is_available() -> bool:
    """True if the kernels can run here: on a GPU, or on the CPU under Triton's interpreter."""
    return _INTERPRET or torch.cuda.is_available()


def _acc_dtype(dtype: torch.dtype) -> tl.dtype:
    """Accumulator type: float64 for float64 data, float32 for everything else (fp16/bf16/fp32)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``t``'s GPU current for the launch (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# launch hook
# --------------------------------------------------------------------------------------------


def _launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs): every launch of this module goes through here.

    One place to observe launches: ``tests/test_gpu_compile.py`` replaces it to record the exact
    arguments and constexprs the launchers pass, and compiles those for real GPUs.
    """
    kernel[grid](*args, **kwargs)


def _capability(t: torch.Tensor) -> tuple[int, int]:
    """Compute capability of t's GPU; (9, 0) under the interpreter (it has no GPU)."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else (9, 0)


# --------------------------------------------------------------------------------------------
# dual_matmul
# --------------------------------------------------------------------------------------------


def _config(
    block_m: int, block_n: int, block_k: int, stages: int, warps: int, group_m: int = 8
) -> triton.Config:
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m}
    return triton.Config(meta, num_stages=stages, num_warps=warps)


# Autotune lists per (operand family, GPU tier), chosen with the AOT compile of
# tests/test_gpu_compile.py: candidates were compiled for sm_90 and sm_80 with the heaviest and
# several random recorded specialisations, and a config is offered only where it fits the tier's
# shared memory and ptxas allocated it without spills, with a margin below 255 registers where
# the choice allowed. Families: "16bit" (bf16/fp16, tensor cores), "tf32" (fp32 on tensor
# cores), "fp32" (IEEE fp32: FMA dots, which hold their operand fragments in registers, so large
# tiles need a short BLOCK_K: 128×128×32 spilled on both tiers, 128×128×8 only on sm_80, and the
# full compile run dropped 128×64×16 on sm_90 and 64×64×8 on sm_80 for 8-48 B spills), "fp64"
# (FMA on sm_90, DMMA on sm_80; 8-byte operands; 128×128×32 spilled 12 KB, and with a bias ptxas
# fell back to 32 registers and a 72 KB spill). Tiers: "sm90" (Hopper and later, 227 KiB per
# block), "sm80" (A100: 163 KiB; mma.sync keeps more in registers than wgmma, so 128×256 tiles
# spill there) and "small" (sm_86/89/120 and the rest: ≤ 99 KiB), which gets the sm80 list minus
# what exceeds 99 KiB.
_DUAL_TABLE: dict[tuple[str, str], list[triton.Config]] = {
    ("16bit", "sm90"): [
        _config(128, 256, 64, stages=3, warps=8),
        _config(128, 128, 64, stages=4, warps=8),
        _config(128, 64, 64, stages=4, warps=8),
        _config(64, 128, 64, stages=4, warps=8),
        _config(64, 64, 64, stages=4, warps=4),
        _config(64, 64, 32, stages=5, warps=4),
    ],
    ("16bit", "sm80"): [
        _config(128, 128, 64, stages=4, warps=8),
        _config(128, 64, 64, stages=4, warps=8),
        _config(64, 128, 64, stages=4, warps=8),
        _config(64, 64, 64, stages=4, warps=4),
        _config(64, 64, 32, stages=5, warps=4),
    ],
    ("tf32", "sm90"): [
        _config(128, 128, 32, stages=4, warps=8),
        _config(128, 64, 32, stages=4, warps=8),
        _config(64, 128, 32, stages=4, warps=8),
        _config(64, 64, 32, stages=5, warps=4),
    ],
    ("tf32", "sm80"): [
        _config(128, 128, 32, stages=3, warps=8),
        _config(128, 64, 32, stages=4, warps=8),
        _config(64, 128, 32, stages=4, warps=8),
        _config(64, 64, 32, stages=4, warps=4),
    ],
    ("fp32", "sm90"): [
        _config(128, 128, 8, stages=3, warps=8),
        _config(64, 64, 32, stages=4, warps=4),
        _config(64, 64, 16, stages=3, warps=8),
        _config(32, 64, 16, stages=3, warps=4),
    ],
    ("fp32", "sm80"): [
        _config(128, 64, 16, stages=3, warps=8),
        _config(64, 128, 16, stages=3, warps=8),
        _config(64, 64, 16, stages=3, warps=8),
        _config(32, 64, 16, stages=3, warps=4),
    ],
    ("fp64", "sm90"): [
        _config(128, 64, 8, stages=3, warps=8),
        _config(64, 64, 16, stages=3, warps=8),
        _config(64, 32, 16, stages=3, warps=4),
        _config(32, 64, 16, stages=3, warps=4),
        _config(32, 32, 16, stages=3, warps=4),
    ],
}
_DUAL_TABLE["fp64", "sm80"] = _DUAL_TABLE["fp64", "sm90"]

# For operands that are not 16-byte aligned (a stride other than 1, or a base address, not a
# multiple of 16 elements / bytes: e.g. Zᵀ = Vᵀ·Xᵀ stored (n, N) with an odd N, read transposed).
# Triton cannot vectorise those loads, every element then carries its own pointer and mask, and
# the large tiles above spill (fp16 128×256×64 on sm_90: up to 2.4 KB). Smaller tiles:
_DUAL_TABLE_UNALIGNED: dict[tuple[str, str], list[triton.Config]] = {
    ("16bit", "sm90"): [
        _config(128, 64, 32, stages=4, warps=8),
        _config(64, 128, 32, stages=4, warps=8),
        _config(64, 64, 32, stages=4, warps=4),
    ],
    ("tf32", "sm90"): [
        _config(128, 64, 32, stages=4, warps=8),
        _config(64, 128, 32, stages=4, warps=8),
        _config(64, 64, 16, stages=3, warps=8),
    ],
    ("tf32", "sm80"): [
        _config(128, 64, 16, stages=4, warps=8),  # 128×64×32 spilled 16 B on one specialisation
        _config(64, 128, 32, stages=4, warps=8),
        _config(64, 64, 16, stages=3, warps=8),
    ],
    # IEEE fp32 without alignment: 64×64×16 and 64×32×16 spilled 8-24 B on some specialisations
    # (ptxas held them to 80-96 registers); these did not on any.
    ("fp32", "sm90"): [
        _config(64, 32, 8, stages=3, warps=4),
        _config(32, 64, 8, stages=3, warps=4),
        _config(32, 32, 16, stages=3, warps=4),
    ],
    ("fp64", "sm90"): [
        _config(64, 64, 16, stages=3, warps=8),
        _config(64, 32, 16, stages=3, warps=4),
        _config(32, 32, 16, stages=3, warps=4),
    ],
}
# The rest compiled spill-free for sm_80 as well, so those tiers share them.
for _family_name in ("16bit", "fp32", "fp64"):
    _DUAL_TABLE_UNALIGNED[_family_name, "sm80"] = _DUAL_TABLE_UNALIGNED[_family_name, "sm90"]

# Shared memory per block (opt-in maximum) of the tiers' reference GPUs, in bytes.
SHARED_MEMORY_LIMIT = {"sm90": 232_448, "sm80": 166_912, "small": 101_376}

# Under the interpreter autotuning would run every config in Python; one small config is enough
# and still gives several tiles, ragged edges and a ragged last tile group on the tests' shapes.
_INTERPRETER_CONFIGS = [_config(32, 32, 32, stages=1, warps=1, group_m=2)]


def _family(dtype: torch.dtype, input_precision: str) -> str:
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        return "tf32" if input_precision == "tf32" else "fp32"
    return "16bit"


def gpu_tier(capability: tuple[int, int]) -> str:
    """'sm90' for compute capability ≥ 9.0 except consumer Blackwell (12.x), 'sm80' for 8.0, else 'small'."""
    major, minor = capability
    if major in (9, 10, 11):
        return "sm90"
    if (major, minor) == (8, 0):
        return "sm80"
    return "small"


def dual_matmul_configs(
    dtype: torch.dtype, input_precision: str, capability: tuple[int, int], aligned: bool = True
) -> list[triton.Config]:
    """The autotune configs ``dual_matmul`` offers for this dtype, precision, GPU generation and
    operand alignment (``_aligned``)."""
    if _INTERPRET:
        return _INTERPRETER_CONFIGS
    tier = gpu_tier(capability)
    family = _family(dtype, input_precision)
    table = _DUAL_TABLE if aligned else _DUAL_TABLE_UNALIGNED
    if tier != "small":
        return table[family, tier]
    # Smaller GPUs: the sm80 configs whose pipelined tiles fit 99 KiB (A and B tiles per stage).
    size = torch.empty(0, dtype=dtype).element_size()
    return [
        c for c in table[family, "sm80"]
        if c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * size
        <= SHARED_MEMORY_LIMIT["small"]
    ]


@triton.jit
def _accumulate_product(
    acc,
    a,
    b,
    m_mask,
    n_mask,
    K,
    stride_ar,
    stride_ak,
    stride_bc,
    stride_bk,
    WIDE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """acc += A·Bᵀ for one output tile; a, b point at the tile's first row of A (R, K) and of B (C, K)."""
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    if WIDE:
        # tl.cast (not .to) because a stride of 1 arrives as a constexpr.
        stride_ar = tl.cast(stride_ar, tl.int64)
        stride_ak = tl.cast(stride_ak, tl.int64)
        stride_bc = tl.cast(stride_bc, tl.int64)
        stride_bk = tl.cast(stride_bk, tl.int64)
    a_ptrs = a + rm[:, None] * stride_ar + rk[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = b + rk[:, None] * stride_bk + rn[None, :] * stride_bc  # (BLOCK_K, BLOCK_N) tile of Bᵀ
    for k0 in range(0, K, BLOCK_K):
        k_mask = rk < K - k0
        a_tile = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b_tile = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a_tile, b_tile, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _dual_matmul_kernel(
    a1,
    b1,
    a2,
    b2,
    bias,
    out,
    R,
    C,
    K1,
    K2,
    stride_a1r,
    stride_a1k,
    stride_b1c,
    stride_b1k,
    stride_a2r,
    stride_a2k,
    stride_b2c,
    stride_b2k,
    stride_bias,
    stride_or,
    stride_oc,
    R_KEY,
    C_KEY,
    K1_KEY,
    K2_KEY,
    HAS_SECOND: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALIGNED: tl.constexpr,
    WIDE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out[R, C] = a1·b1ᵀ (+ a2·b2ᵀ) (+ bias): both products go into one accumulator tile.

    R_KEY … K2_KEY are the sizes rounded up to powers of two: the autotuner's key, unused here.
    ALIGNED (every base address and non-unit stride a multiple of 16) chose the config list and
    keeps the two lists' tunings apart; the kernel itself does not read it.
    """
    # Grouped ("swizzled") tile order: GROUP_M consecutive programs share B tiles in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(R, BLOCK_M)
    num_pid_n = tl.cdiv(C, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    # The tile's first row and column, in int64: R·stride can pass 2**31 on a large tensor.
    row0 = pid_m.to(tl.int64) * BLOCK_M
    col0 = pid_n.to(tl.int64) * BLOCK_N
    m_mask = tl.arange(0, BLOCK_M) < R - row0
    n_mask = tl.arange(0, BLOCK_N) < C - col0
    if HAS_BIAS:
        # The bias row starts the accumulator: one broadcast per tile before the K loops, and
        # no second pass over the accumulator in the epilogue.
        rn = tl.arange(0, BLOCK_N)
        bias_row = tl.load(bias + col0 * stride_bias + rn * stride_bias, mask=n_mask, other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE) + bias_row.to(ACC_DTYPE)[None, :]
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    acc = _accumulate_product(
        acc,
        a1 + row0 * stride_a1r,
        b1 + col0 * stride_b1c,
        m_mask,
        n_mask,
        K1,
        stride_a1r,
        stride_a1k,
        stride_b1c,
        stride_b1k,
        WIDE,
        INPUT_PRECISION,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
    )
    if HAS_SECOND:
        acc = _accumulate_product(
            acc,
            a2 + row0 * stride_a2r,
            b2 + col0 * stride_b2c,
            m_mask,
            n_mask,
            K2,
            stride_a2r,
            stride_a2k,
            stride_b2c,
            stride_b2k,
            WIDE,
            INPUT_PRECISION,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
        )
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    if WIDE:
        stride_or = tl.cast(stride_or, tl.int64)
        stride_oc = tl.cast(stride_oc, tl.int64)
    out_ptrs = out + row0 * stride_or + col0 * stride_oc + rm[:, None] * stride_or + rn[None, :] * stride_oc
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


# One autotuner per config list (dtype family × GPU tier), made on first use; they share the
# kernel, and each keeps its own tuning cache.
_DUAL_TUNERS: dict[tuple[int, ...], triton.runtime.Autotuner] = {}


def _dual_tuner(configs: list[triton.Config]):
    key = tuple(id(c) for c in configs)
    if key not in _DUAL_TUNERS:
        # Tuned per power-of-two bucket of the sizes, not per exact size: the row count N changes
        # from batch to batch (and is the reduction length of G = dYᵀ·X), and every new key costs
        # a full tune.
        _DUAL_TUNERS[key] = triton.autotune(configs=configs, key=["R_KEY", "C_KEY", "K1_KEY", "K2_KEY"])(
            _dual_matmul_kernel
        )
    return _DUAL_TUNERS[key]


def tf32_enabled() -> bool:
    """Whether PyTorch itself would run a float32 CUDA matmul on TF32 tensor cores right now.

    PyTorch ≥ 2.9 resolves ``torch.backends.cuda.matmul.fp32_precision`` ("tf32" / "ieee", or
    "none" = inherit from ``torch.backends.fp32_precision``, default IEEE) from whichever API was
    used, the new one or the legacy ``allow_tf32`` / ``set_float32_matmul_precision``. Reading the
    legacy ``allow_tf32`` after the new API was used raises ("mix of the legacy and new APIs"),
    so the legacy flag is read only on versions without the new one.
    """
    matmul = torch.backends.cuda.matmul
    try:
        precision = matmul.fp32_precision
    except AttributeError:
        return bool(matmul.allow_tf32)
    return precision == "tf32"


def input_precision(dtype: torch.dtype) -> str:
    """TF32 only where PyTorch would use it for the same float32 matmul; exact products otherwise."""
    return "tf32" if dtype == torch.float32 and tf32_enabled() else "ieee"


def _aligned(tensors: tuple[torch.Tensor, ...], strides: tuple[int, ...]) -> bool:
    """Whether Triton's JIT will see every base address and every non-unit stride as divisible by
    16 (the condition for vectorised loads; bytes for addresses, elements for strides)."""
    return all(t.data_ptr() % 16 == 0 for t in tensors) and all(s % 16 == 0 for s in strides if s != 1)


# Largest tile side × 2: the in-tile offset bound used to decide WIDE (see _dual_matmul_kernel).
_WIDE_STRIDE = 2**31 // 512


def dual_matmul(
    a1: torch.Tensor,
    b1: torch.Tensor,
    a2: torch.Tensor | None = None,
    b2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """a1·b1ᵀ + a2·b2ᵀ + bias, accumulated into one output (R, C) of a1's dtype.

    a1 (R, K1), b1 (C, K1), optional a2 (R, K2) with b2 (C, K2), optional bias (C,); any strides
    (transposed views such as ``W.t()`` are read in place, never copied).
    """
    assert a1.dim() == 2 and b1.dim() == 2 and a1.shape[1] == b1.shape[1]
    assert (a2 is None) == (b2 is None)
    assert b1.device == a1.device and b1.dtype == a1.dtype
    R, C, K1 = a1.shape[0], b1.shape[0], a1.shape[1]
    out = torch.empty((R, C), dtype=a1.dtype, device=a1.device)
    if R == 0 or C == 0:
        return out
    has_second = a2 is not None
    if has_second:
        assert a2.dim() == 2 and b2.dim() == 2 and a2.shape[0] == R and b2.shape[0] == C
        assert a2.shape[1] == b2.shape[1]
        assert a2.device == b2.device == a1.device and a2.dtype == b2.dtype == a1.dtype
    else:
        a2, b2 = a1, b1  # never read (HAS_SECOND is False); any valid tensor will do
    has_bias = bias is not None
    if has_bias:
        assert bias.shape == (C,) and bias.device == a1.device
    else:
        bias = out  # never read (HAS_BIAS is False)
    K2 = a2.shape[1] if has_second else 0
    strides = (*a1.stride(), *b1.stride(), *a2.stride(), *b2.stride(), bias.stride(0), *out.stride())
    precision = input_precision(a1.dtype)
    aligned = _aligned((a1, b1, a2, b2, bias, out), strides)
    kernel = _dual_tuner(dual_matmul_configs(a1.dtype, precision, _capability(a1), aligned))

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(R, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_N"]),)

    with _on_device(a1):
        _launch(
            kernel,
            grid,
            a1,
            b1,
            a2,
            b2,
            bias,
            out,
            R,
            C,
            K1,
            K2,
            a1.stride(0),
            a1.stride(1),
            b1.stride(0),
            b1.stride(1),
            a2.stride(0),
            a2.stride(1),
            b2.stride(0),
            b2.stride(1),
            bias.stride(0) if has_bias else 0,
            out.stride(0),
            out.stride(1),
            *(triton.next_power_of_2(max(size, 1)) for size in (R, C, K1, K2)),
            HAS_SECOND=has_second,
            HAS_BIAS=has_bias,
            ALIGNED=aligned,
            WIDE=max(abs(s) for s in strides) >= _WIDE_STRIDE,
            ACC_DTYPE=_acc_dtype(a1.dtype),
            INPUT_PRECISION=precision,
        )
    return out


# --------------------------------------------------------------------------------------------
# m_matmul
# --------------------------------------------------------------------------------------------

# Largest block of R columns per program. Small under the interpreter so that the tests'
# shapes span several column blocks (and exercise their masks).
_M_BLOCK_R_MAX = 32 if _INTERPRET else 256


def _m_matmul_config(R: int) -> triton.Config:
    """Block of R columns per program: the next power of two ≤ the maximum; a warp per 64 columns."""
    block_r = min(triton.next_power_of_2(max(R, 1)), _M_BLOCK_R_MAX)
    return triton.Config({"BLOCK_R": block_r}, num_warps=max(1, min(4, block_r // 64)))


def m_matmul_configs() -> list[triton.Config]:
    """Every config ``m_matmul``'s launcher can pick (one per power-of-two block of columns)."""
    return [_m_matmul_config(2**i) for i in range(_M_BLOCK_R_MAX.bit_length())]


@triton.jit
def _m_matmul_kernel(
    b,
    diag,
    values,
    ptr,
    idx,
    perm,
    out,
    R,
    stride_bn,
    stride_br,
    stride_diag,
    stride_ptr,
    stride_values,
    stride_idx,
    stride_perm,
    stride_on,
    USE_PERM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """out[i, :] = diag[i]·b[i, :] + Σ_{e ∈ [ptr[i], ptr[i+1])} values[j_e]·b[idx[j_e], :].

    j_e = perm[e] if USE_PERM else e. CSR (M·b): ptr = csr_ptr, idx = column indices, no perm.
    CSC (Mᵀ·b): ptr = csc_ptr, idx = row indices, perm = csc_perm.
    Grid: (n rows, blocks of BLOCK_R columns of R).
    """
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    col_mask = cols < R
    col_offs = cols * stride_br
    d = tl.load(diag + i * stride_diag).to(ACC_DTYPE)
    acc = d * tl.load(b + i * stride_bn + col_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
    start = tl.load(ptr + i * stride_ptr)
    end = tl.load(ptr + (i + 1) * stride_ptr)
    for e in range(start, end):
        if USE_PERM:
            j = tl.load(perm + e * stride_perm)
        else:
            j = e
        src = tl.load(idx + j * stride_idx)
        v = tl.load(values + j * stride_values).to(ACC_DTYPE)
        acc += v * tl.load(b + src * stride_bn + col_offs, mask=col_mask, other=0.0).to(ACC_DTYPE)
    tl.store(out + i * stride_on + cols, acc.to(out.dtype.element_ty), mask=col_mask)


def m_matmul(
    b: torch.Tensor,
    diag: torch.Tensor,
    values: torch.Tensor,
    pattern: SparsePattern,
    transpose: bool = False,
) -> torch.Tensor:
    """M·b (or Mᵀ·b) with M = diag(diag) + S, S[r_j, c_j] = values[j]; b is (n, R), any strides.

    Returns a contiguous (n, R) tensor of b's dtype. Cost O(R·(n+k)), no temporaries.
    """
    assert b.dim() == 2 and diag.dim() == 1 and values.dim() == 1
    assert b.device == diag.device == values.device == pattern.indices.device
    n, R = b.shape
    out = torch.empty((n, R), dtype=b.dtype, device=b.device)
    if R == 0:
        return out
    if b.stride(1) != 1:
        # Each program gathers whole rows of b: coalesced only when rows are contiguous. The copy
        # is O(n·R), the same order as the product itself.
        b = b.contiguous()
    if transpose:
        ptr, idx, perm = pattern.csc_ptr, pattern.indices[0], pattern.csc_perm
    else:
        # Row-major entries are already in CSR order: the value index is the entry number.
        ptr, idx, perm = pattern.csr_ptr, pattern.indices[1], pattern.csr_ptr  # perm never read
    config = _m_matmul_config(R)
    with _on_device(b):
        _launch(
            _m_matmul_kernel,
            (n, triton.cdiv(R, config.kwargs["BLOCK_R"])),
            b,
            diag,
            values,
            ptr,
            idx,
            perm,
            out,
            R,
            b.stride(0),
            b.stride(1),
            diag.stride(0),
            ptr.stride(0),
            values.stride(0),
            idx.stride(0),
            perm.stride(0),
            out.stride(0),
            USE_PERM=transpose,
            ACC_DTYPE=_acc_dtype(b.dtype),
            num_warps=config.num_warps,
            **config.kwargs,
        )
    return out


# --------------------------------------------------------------------------------------------
# sddmm
# --------------------------------------------------------------------------------------------

# Entries per program and largest T block; small under the interpreter so that the tests
# cover several entry blocks and several T iterations.
_SDDMM_BLOCK_E = 16 if _INTERPRET else 32
_SDDMM_BLOCK_T_MAX = 16 if _INTERPRET else 128


def _sddmm_config(T: int) -> triton.Config:
    """BLOCK_E sampled entries per program, T reduced in blocks of up to BLOCK_T."""
    block_t = min(triton.next_power_of_2(max(T, 1)), _SDDMM_BLOCK_T_MAX)
    # Rows are gathered (data-dependent addresses), so every element holds its own 64-bit pointer:
    # a 32 × 128 fp64 tile on 4 warps needed 255 registers and spilled ~400 B; 8 warps: ≤ 214, none.
    return triton.Config({"BLOCK_E": _SDDMM_BLOCK_E, "BLOCK_T": block_t}, num_warps=8 if block_t >= 128 else 4)


def sddmm_configs() -> list[triton.Config]:
    """Every config ``sddmm``'s launcher can pick (one per power-of-two block of T)."""
    return [_sddmm_config(2**i) for i in range(_SDDMM_BLOCK_T_MAX.bit_length())]


@triton.jit
def _sddmm_kernel(
    at,
    bt,
    rows,
    cols,
    out,
    E,
    T,
    stride_an,
    stride_at,
    stride_bn,
    stride_bt,
    stride_rows,
    stride_cols,
    IS_DIAG: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """out[e] = Σ_t at[r_e, t]·bt[c_e, t] for e < E.

    (r_e, c_e) = (e, e) if IS_DIAG (rows / cols are not read), else (rows[e], cols[e]).
    """
    e = tl.program_id(0).to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e < E
    if IS_DIAG:
        r = e
        c = e
    else:
        r = tl.load(rows + e * stride_rows, mask=e_mask, other=0)
        c = tl.load(cols + e * stride_cols, mask=e_mask, other=0)
    t = tl.arange(0, BLOCK_T)
    # int64 T offsets: t·stride can pass 2**31 when at or bt is a transposed (column-major) view.
    stride_at = tl.cast(stride_at, tl.int64)
    stride_bt = tl.cast(stride_bt, tl.int64)
    a_ptrs = at + r[:, None] * stride_an + t[None, :] * stride_at
    b_ptrs = bt + c[:, None] * stride_bn + t[None, :] * stride_bt
    acc = tl.zeros((BLOCK_E,), dtype=ACC_DTYPE)
    for t0 in range(0, T, BLOCK_T):
        mask = e_mask[:, None] & (t[None, :] < T - t0)
        a = tl.load(a_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        b = tl.load(b_ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
        acc += tl.sum(a * b, axis=1)
        a_ptrs += BLOCK_T * stride_at
        b_ptrs += BLOCK_T * stride_bt
    tl.store(out + e, acc.to(out.dtype.element_ty), mask=e_mask)


def _launch_sddmm(
    at: torch.Tensor,
    bt: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    out: torch.Tensor,
    is_diag: bool,
) -> None:
    E, T = out.numel(), at.shape[1]
    config = _sddmm_config(T)
    _launch(
        _sddmm_kernel,
        (triton.cdiv(E, config.kwargs["BLOCK_E"]),),
        at,
        bt,
        rows,
        cols,
        out,
        E,
        T,
        at.stride(0),
        at.stride(1),
        bt.stride(0),
        bt.stride(1),
        rows.stride(0),
        cols.stride(0),
        IS_DIAG=is_diag,
        ACC_DTYPE=_acc_dtype(at.dtype),
        num_warps=config.num_warps,
        **config.kwargs,
    )


def sddmm(at: torch.Tensor, bt: torch.Tensor, pattern: SparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Diagonal and Ω entries of C = at·btᵀ; at, bt are (n, T), any strides.

    Returns (diag_vals (n,), pattern_vals (k,)) in at's dtype: diag_vals[i] = C[i, i],
    pattern_vals[j] = C[r_j, c_j]. Cost O(T·(n+k)); C itself is never formed.
    """
    assert at.dim() == 2 and at.shape == bt.shape
    assert at.device == bt.device == pattern.indices.device
    n, T = at.shape
    diag_vals = torch.empty(n, dtype=at.dtype, device=at.device)
    pattern_vals = torch.empty(pattern.k, dtype=at.dtype, device=at.device)
    if T == 0:
        return diag_vals.zero_(), pattern_vals.zero_()
    rows, cols = pattern.indices[0], pattern.indices[1]
    with _on_device(at):
        # Two launches of one kernel; the diagonal one needs no index arrays (IS_DIAG).
        _launch_sddmm(at, bt, rows, cols, diag_vals, is_diag=True)
        if pattern.k > 0:
            _launch_sddmm(at, bt, rows, cols, pattern_vals, is_diag=False)
    return diag_vals, pattern_vals
