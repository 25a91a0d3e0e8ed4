"""The bad-input catalogue (docs/hardening.md §Errors): every case raises a clear error naming the problem.

Grouped by where the problem enters: the functional call (x against the layer's tensors), the
sparse pattern, construction parameters, decomposition, merge, model targeting, adapter files.
Non-finite inputs are not errors: they propagate like ``nn.Linear``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.decomposition import joint_decompose
from frod_kernels.pattern import SparsePattern, sample_sparse_pattern

from _problems import frod_layer, make_problem

N_IN, N_OUT = 6, 5


class _Net(nn.Module):
    """Two blocks with a 'proj' category (6 -> 6) and a 'head' (6 -> 3)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(nn.ModuleDict({"proj": nn.Linear(6, 6), "norm": nn.LayerNorm(6)}) for _ in range(2))
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b["norm"](torch.tanh(b["proj"](x)))
        return self.head(x)


def _frod_net(seed: int = 0, **kw) -> _Net:
    net = _Net(seed)
    fk.apply_frod(net, ["proj"], sparse_rate=0.2, seed=0, **kw)
    with torch.no_grad():
        for layer in fk.frod_layers(net).values():
            layer.delta.normal_()
            layer.sparse_values.normal_()
    return net


# -- functional: x against the layer's tensors --------------------------------------------------

_ARGS = ("x", "weight", "bias", "U", "V", "delta", "indices", "values")


def _call_with(name: str, value, **kw):
    p = make_problem((3,), o=N_OUT, n=N_IN, rate=0.2, seed=1)
    args = {a: getattr(p, a) for a in _ARGS}
    args[name] = value
    return fk.frod_linear(*(args[a] for a in _ARGS), **kw)


def _f64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize(
    "name,value,exc,match",
    [
        ("x", torch.ones(3, N_IN, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
        ("x", [[1.0] * N_IN], TypeError, "x must be a floating-point tensor"),
        ("x", _f64(3, N_IN + 1), ValueError, r"last dimension \(7,\), expected in_features = 6"),
        ("x", torch.tensor(1.0, dtype=torch.float64), ValueError, "last dimension"),
        ("x", _f64(3, N_IN).float(), TypeError, "U has dtype torch.float64, but x has dtype torch.float32"),
        ("x", _f64(3, N_IN).to("meta"), ValueError, "U is on cpu, but x is on meta"),
        ("U", _f64(N_OUT, N_IN, 1), ValueError, "U must be 2-D"),
        ("U", None, TypeError, "U must be a tensor"),
        ("U", _f64(N_OUT, N_IN).float(), TypeError, "U has dtype torch.float32, but x has dtype torch.float64"),
        ("U", _f64(N_OUT, N_IN).to("meta"), ValueError, "U is on meta, but x is on cpu"),
        ("V", _f64(N_IN, N_IN + 1), ValueError, r"V has shape \(6, 7\), expected \(6, 6\)"),
        ("V", _f64(N_IN, N_IN).half(), TypeError, "V has dtype torch.float16"),
        ("V", _f64(N_IN, N_IN).to("meta"), ValueError, "V is on meta"),
        ("weight", _f64(N_OUT + 1, N_IN), ValueError, r"weight has shape \(6, 6\), expected \(5, 6\)"),
        ("weight", _f64(N_OUT, N_IN).bfloat16(), TypeError, "weight has dtype torch.bfloat16"),
        ("weight", _f64(N_OUT, N_IN).to("meta"), ValueError, "weight is on meta"),
        ("bias", _f64(N_OUT + 2), ValueError, r"bias has shape \(7,\), expected \(5,\)"),
        ("bias", _f64(N_OUT).float(), TypeError, "bias has dtype torch.float32"),
        ("bias", _f64(N_OUT).to("meta"), ValueError, "bias is on meta"),
        ("delta", _f64(N_IN + 1), ValueError, r"delta has shape \(7,\), expected \(6,\)"),
        ("delta", _f64(N_IN, 1), ValueError, "delta has shape"),
        ("delta", torch.ones(N_IN, dtype=torch.int64), TypeError, "delta must be floating point"),
        ("delta", _f64(N_IN).to("meta"), ValueError, "delta is on meta"),
        ("values", _f64(2), ValueError, r"sparse_values has shape \(2,\), expected \(7,\)"),
        ("values", torch.ones(7, dtype=torch.int32), TypeError, "sparse_values must be floating point"),
        ("values", _f64(7).to("meta"), ValueError, "sparse_values is on meta"),
        ("indices", sample_sparse_pattern(N_IN, 0.2, 1).to("meta"), ValueError, "sparse_indices are on meta"),
        ("indices", SparsePattern.from_indices(sample_sparse_pattern(5, 0.2, 1), 5), ValueError,
         "sparse pattern is for n = 5, but in_features = 6"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 12 else "",
)
def test_functional_mismatch(name, value, exc, match):
    with pytest.raises(exc, match=match):
        _call_with(name, value)


@pytest.mark.parametrize(
    "kw,match", [({"backend": "cuda"}, "backend must be one of"), ({"path": "fast"}, "path must be one of")]
)
def test_functional_bad_choice(kw, match):
    with pytest.raises(ValueError, match=match):
        _call_with("x", _f64(3, N_IN), **kw)


# -- the sparse pattern ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "indices,exc,match",
    [
        (torch.tensor([[0, 1], [1, 6]]), ValueError, r"out of range for an 6 x 6 matrix \(min 0, max 6\)"),
        (torch.tensor([[0, -1], [1, 2]]), ValueError, "out of range"),
        (torch.tensor([[0, 2, 2], [1, 3, 3]]), ValueError, r"without duplicates: \(2, 3\) is duplicated"),
        (torch.tensor([[0, 3], [1, 3]]), ValueError, r"off-diagonal .*entry 1 is \(3, 3\)"),
        (torch.tensor([[2, 0], [1, 1]]), ValueError, "out of order"),
        (torch.tensor([[0, 1], [1, 2]], dtype=torch.int32), ValueError, "must be int64, got torch.int32"),
        (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), ValueError, "must be int64"),
        (torch.tensor([0, 1]), ValueError, r"shape \(2, k\)"),
        ([[0, 1], [1, 2]], TypeError, "sparse_indices must be a tensor"),
    ],
)
def test_bad_pattern(indices, exc, match):
    p = make_problem((3,), o=N_OUT, n=N_IN, rate=0.2, seed=1)
    k = indices.shape[-1] if isinstance(indices, torch.Tensor) else 2
    with pytest.raises(exc, match=match):
        fk.frod_linear(p.x, p.weight, p.bias, p.U, p.V, p.delta, indices, _f64(k))


# -- the layer ---------------------------------------------------------------------------------


def test_layer_input_mismatches():
    layer = frod_layer(N_OUT, N_IN)
    with pytest.raises(TypeError, match="has dtype torch.float32, but x has dtype torch.float64"):
        layer(_f64(2, N_IN))
    with pytest.raises(ValueError, match="expected in_features = 6"):
        layer(torch.randn(2, N_IN + 1))
    with pytest.raises(ValueError, match="is on cpu, but x is on meta"):
        layer(torch.randn(2, N_IN, device="meta"))
    layer.U = layer.U.double()  # a buffer converted on its own
    with pytest.raises(TypeError, match="U has dtype torch.float64"):
        layer(torch.randn(2, N_IN))


def test_layer_construction_errors():
    lin = nn.Linear(N_IN, N_OUT)
    with pytest.raises(TypeError, match="from_linear expects an nn.Linear, got Conv1d"):
        fk.FRoDLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="mode must be one of"):
        fk.FRoDLinear.from_linear(lin, mode="replace")
    with pytest.raises(TypeError, match="param_dtype must be a floating-point dtype"):
        fk.FRoDLinear.from_linear(lin, param_dtype=torch.int32)
    layer = frod_layer(N_OUT, N_IN)
    with pytest.raises(ValueError, match="basis does not fit a"):
        fk.FRoDLinear(lin.weight, None, layer.U[:, :3], layer.lam, layer.basis)
    with pytest.raises(ValueError, match="backend must be one of"):
        layer.backend = "gpu"
    with pytest.raises(ValueError, match="path must be one of"):
        layer.path = "both"


@pytest.mark.parametrize(
    "kw,exc,match",
    [
        ({"sparse_rate": -0.1}, ValueError, "sparse_rate must be in"),
        ({"sparse_rate": 1.0}, ValueError, "sparse_rate must be in"),
        ({"sparse_rate": math.nan}, ValueError, "sparse_rate must be in"),
        ({"sparse_rate": "0.1"}, TypeError, "sparse_rate must be a number"),
        ({"sparse_rate": True}, TypeError, "sparse_rate must be a number"),
        ({"reg": 0.0}, ValueError, "reg must be a positive finite number"),
        ({"reg": -1e-3}, ValueError, "reg must be a positive finite number"),
        ({"reg": math.inf}, ValueError, "reg must be a positive finite number"),
        ({"reg": math.nan}, ValueError, "reg must be a positive finite number"),
        ({"reg": "1e-3"}, TypeError, "reg must be a number"),
        ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, ValueError, "seed must be in"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"seed": True}, TypeError, "seed must be an int"),
    ],
)
@pytest.mark.parametrize("entry", ["from_linear", "apply_frod"])
def test_parameters_out_of_range(entry, kw, exc, match):
    with pytest.raises(exc, match=match):
        if entry == "from_linear":
            fk.FRoDLinear.from_linear(nn.Linear(N_IN, N_OUT), **kw)
        else:
            fk.apply_frod(_Net(), ["proj"], **kw)


def test_apply_frod_bad_mode():
    with pytest.raises(ValueError, match="mode must be one of"):
        fk.apply_frod(_Net(), ["proj"], mode="lora")


# -- decomposition -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weights_at_decomposition(bad):
    w = torch.randn(N_OUT, N_IN)
    w[2, 3] = bad
    with pytest.raises(ValueError, match="weight 1 has non-finite entries"):
        joint_decompose([torch.randn(N_OUT, N_IN), w])
    net = _Net()
    with torch.no_grad():
        net.head.weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"category 'head': weight 0 has non-finite entries"):
        fk.apply_frod(net, ["proj", "head"])  # the 'proj' category comes first and is fine
    assert not fk.frod_layers(net), "a failed apply_frod must not leave FRoD layers behind"
    assert all(p.requires_grad for p in net.parameters()), "nor frozen parameters"


def test_decomposition_shape_errors():
    with pytest.raises(ValueError, match="at least one weight"):
        joint_decompose([])
    with pytest.raises(ValueError, match=r"weight 1 has shape \(5, 7\), expected \(5, 6\)"):
        joint_decompose([torch.randn(5, 6), torch.randn(5, 7)])
    with pytest.raises(ValueError, match="must be a 2-D tensor"):
        joint_decompose([torch.randn(5)])
    with pytest.raises(ValueError, match="must be a floating-point tensor"):
        joint_decompose([torch.ones(5, 6, dtype=torch.int64)])


# -- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("where,bad", [("delta", math.nan), ("sparse_values", math.inf)])
def test_safe_merge_refuses_non_finite(mode, where, bad):
    layer = frod_layer(N_OUT, N_IN, mode=mode)
    before = None if mode == "factored" else layer.weight.detach().clone()
    with torch.no_grad():
        getattr(layer, where)[1] = bad
    with pytest.raises(ValueError, match="merge refused: the merged weight would hold NaN or Inf"):
        layer.merge(safe=True)
    assert not layer.merged
    if mode == "additive":
        assert torch.equal(layer.weight, before)
    else:
        assert isinstance(layer.weight, fk.layer.FactoredWeight)


def test_merge_frod_rolls_back_when_one_layer_refuses():
    net = _frod_net()
    first, second = fk.frod_layers(net).values()
    before = first.weight.detach().clone()
    with torch.no_grad():
        second.delta[0] = math.nan
    with pytest.raises(ValueError, match="merge refused"):
        fk.merge_frod(net)
    assert not first.merged and not second.merged
    assert torch.equal(first.weight, before)


def test_factored_weight_refuses_tensor_use():
    layer = frod_layer(N_OUT, N_IN, mode="factored")
    w = layer.weight
    assert (w.shape, w.dtype, w.device, w.requires_grad) == ((N_OUT, N_IN), torch.float32, torch.device("cpu"), False)
    with pytest.raises(TypeError, match="factored FRoDLinear stores no weight tensor; use effective_weight"):
        nn.functional.linear(torch.randn(2, N_IN), w)
    with pytest.raises(TypeError, match="stores no weight tensor"):
        torch.matmul(torch.randn(2, N_OUT), w)


# -- non-finite x: propagate like nn.Linear ----------------------------------------------------


@pytest.mark.parametrize("path", ["token", "weight"])
@pytest.mark.parametrize("grad", [False, True])
def test_non_finite_x_propagates_like_linear(path, grad):
    layer = frod_layer(N_OUT, N_IN)
    layer.path = path
    dense = nn.Linear(N_IN, N_OUT)
    with torch.no_grad():
        dense.weight.copy_(layer.effective_weight())
        dense.bias.copy_(layer.bias)
    x = torch.randn(4, 3, N_IN)
    x[0, 1, 2], x[2, 0, 5], x[3, 2, 0] = math.nan, math.inf, -math.inf
    bad_rows = ~torch.isfinite(x).all(-1)
    with torch.set_grad_enabled(grad):
        y, y_ref = layer(x.requires_grad_(grad)), dense(x)
    # Rows with a non-finite input are non-finite in both (an Inf may become NaN through M's
    # zero entries, as 0·Inf would in any product); every other row matches and stays finite.
    assert torch.equal(~torch.isfinite(y).all(-1), bad_rows)
    assert torch.equal(~torch.isfinite(y_ref).all(-1), bad_rows)
    torch.testing.assert_close(y[~bad_rows], y_ref[~bad_rows], rtol=1e-5, atol=1e-5)
    if grad:
        # Backward through the finite rows only: dX of those rows matches nn.Linear's; the
        # parameter gradients see 0·NaN from the bad rows (dW = dYᵀX), as nn.Linear's weight does.
        x_ref = x.detach().requires_grad_()
        y[~bad_rows].sum().backward()
        dense(x_ref)[~bad_rows].sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
        assert not torch.isfinite(dense.weight.grad).all() and not torch.isfinite(layer.delta.grad).all()


# -- apply_frod targets ------------------------------------------------------------------------


def test_targets():
    with pytest.raises(ValueError, match=r"target_modules \['nope'\] matched no module of the model"):
        fk.apply_frod(_Net(), ["nope"])
    with pytest.raises(ValueError, match="matched no module"):
        fk.apply_frod(_Net(), r"blocks\.9\.proj")
    with pytest.raises(TypeError, match="target 'blocks.0.norm' is a LayerNorm, not an nn.Linear"):
        fk.apply_frod(_Net(), ["norm"])
    with pytest.raises(ValueError, match="non-empty list of module-name suffixes"):
        fk.apply_frod(_Net(), [])
    net = _frod_net()
    with pytest.raises(ValueError, match="'blocks.0.proj' is already a FRoD layer"):
        fk.apply_frod(net, ["proj"])


# -- adapter files -----------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path: Path) -> tuple[_Net, Path]:
    net = _frod_net()
    path = tmp_path / "adapter.safetensors"
    fk.save_frod(net, path)
    return net, path


def test_truncated_adapter(saved):
    _, path = saved
    data = path.read_bytes()
    for cut in (3, 20, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="not a readable safetensors file"):
            fk.load_frod(_Net(), path)


def test_foreign_adapter(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({"w": torch.randn(3)}, str(path))
    with pytest.raises(ValueError, match="not a FRoD adapter"):
        fk.load_frod(_Net(), path)
    path.write_text("this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        fk.load_frod(_Net(), path)
    with pytest.raises(FileNotFoundError, match="no adapter file at"):
        fk.load_frod(_Net(), tmp_path / "missing.safetensors")


@pytest.mark.parametrize(
    "metadata,match",
    [
        ({"version": "99"}, "format version '99'"),
        ({"categories": "{not json"}, "damaged FRoD metadata: not JSON"),
    ],
)
def test_damaged_metadata(saved, metadata, match):
    net, path = saved
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {**f.metadata(), **metadata}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=match):
        fk.load_frod(net, path)


def test_adapter_does_not_match_the_model(saved):
    _, path = saved
    with pytest.raises(ValueError, match=r"category 'blocks\.\*\.proj': the model's base weights differ"):
        fk.load_frod(_Net(seed=1), path)
    other_seed = _Net()
    fk.apply_frod(other_seed, ["proj"], sparse_rate=0.2, seed=5)
    with pytest.raises(ValueError, match="sparse pattern differs"):
        fk.load_frod(other_seed, path)
    other_layers = _Net()
    fk.apply_frod(other_layers, ["head"], sparse_rate=0.2, seed=0)
    with pytest.raises(ValueError, match=r"adapter category 'blocks\.\*\.proj' has no FRoD layers in the model"):
        fk.load_frod(other_layers, path)


def test_adapter_state_dict_errors():
    net = _frod_net()
    sd = fk.frod_state_dict(net)
    with pytest.raises(ValueError, match="adapter lacks 1 FRoD tensors"):
        fk.load_frod_state_dict(net, {k: v for k, v in sd.items() if k != "blocks.1.proj.delta"})
    with pytest.raises(ValueError, match="adapter tensor 'head.weight2' matches no parameter"):
        fk.load_frod_state_dict(net, {**sd, "head.weight2": torch.randn(3)})
    with pytest.raises(ValueError, match=r"'blocks.0.proj.delta' has shape \(7,\), the model's \(6,\)"):
        fk.load_frod_state_dict(net, {**sd, "blocks.0.proj.delta": torch.randn(7)})
    with pytest.raises(TypeError, match="'blocks.0.proj.delta' has dtype torch.int64"):
        fk.load_frod_state_dict(net, {**sd, "blocks.0.proj.delta": torch.ones(6, dtype=torch.int64)})
    with pytest.raises(ValueError, match="'blocks.0.proj.delta' holds NaN or Inf"):
        fk.load_frod_state_dict(net, {**sd, "blocks.0.proj.delta": torch.full((6,), math.nan)})
    with pytest.raises(ValueError, match="the model has no FRoD layers"):
        fk.frod_state_dict(_Net())


def test_interrupted_save_keeps_the_good_file(saved, monkeypatch):
    net, path = saved
    good = path.read_bytes()
    real_save = safetensors.torch.save_file

    def crash_midway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # half-written, then the process "dies"
            f.truncate(len(Path(filename).read_bytes()) // 2)
        raise KeyboardInterrupt("killed during save")

    with torch.no_grad():
        fk.frod_layers(net)["blocks.0.proj"].delta.add_(1.0)
    monkeypatch.setattr(safetensors.torch, "save_file", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        fk.save_frod(net, path)
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name], "temporary file left behind"
    fk.load_frod(_Net(), path)  # still a good adapter
