"""Adapter and model state across sequences of calls: a loaded model computes exactly the saved
function or the call is refused, and a refused call leaves the model exactly as it was.

Each test names the case it guards. The wrong-function cases compare the loaded model's output
with the saved model's (float32, rtol 1e-6) or expect a ValueError.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels import decomposition
from frod_kernels.factored_weight import FactoredWeight

from _problems import make_problem, randomise_frod

IN = 12


class _Net(nn.Module):
    """Three blocks with a 'proj' (12 -> 12) and an 'up' (12 -> 20 -> back by 'down'), and a head."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(IN, IN), "up": nn.Linear(IN, 20), "down": nn.Linear(20, IN)})
            for _ in range(3)
        )
        self.head = nn.Linear(IN, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b["proj"](x)) + b["down"](torch.relu(b["up"](x)))
        return self.head(x)


X = torch.randn(4, 5, IN, generator=torch.Generator().manual_seed(3))


def _trained(seed: int = 0, targets=("proj", "up", "down"), scale: float = 0.3, **kw) -> _Net:
    net = _Net(seed)
    fk.apply_frod(net, list(targets), sparse_rate=0.2, seed=7, **kw)
    randomise_frod(net, scale)
    return net


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _snapshot(model: nn.Module) -> tuple[list, dict, list]:
    """Everything a refused call must leave alone: module classes, values, requires_grad flags."""
    return (
        [(name, type(m)) for name, m in model.named_modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
        [(name, p.requires_grad) for name, p in model.named_parameters()],
    )


def _assert_unchanged(model: nn.Module, snap: tuple[list, dict, list]) -> None:
    modules, state, flags = _snapshot(model)
    assert modules == snap[0]
    assert state.keys() == snap[1].keys() and all(torch.equal(state[k], snap[1][k]) for k in state)
    assert flags == snap[2]


def _rewrite(path: Path, tensors=None, **meta_changes) -> None:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {**f.metadata(), **meta_changes}
        old = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(old if tensors is None else tensors(old), str(path), metadata=meta)


def _edit_categories(path: Path, edit) -> None:
    with safetensors.safe_open(str(path), framework="pt") as f:
        cats = json.loads(f.metadata()["categories"])
    edit(cats)
    _rewrite(path, categories=json.dumps(cats))


# -- 1. every input of the basis must match ---------------------------------------------------


def test_reg_is_part_of_the_basis(tmp_path):
    net = _trained(reg=1e-3)
    path = tmp_path / "a.safetensors"
    fk.save_frod(net, path)
    other = _Net()
    fk.apply_frod(other, ["proj", "up", "down"], sparse_rate=0.2, seed=7, reg=1e-2)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"decomposed with reg=0.01, the adapter's with reg=0.001"):
        fk.load_frod(other, path)
    _assert_unchanged(other, snap)
    _close(fk.load_frod(_Net(), path)(X), net(X))  # a bare model takes the file's reg


def test_algorithm_version_is_checked(tmp_path):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)
    _edit_categories(path, lambda cats: [c.update(algorithm=0) for c in cats.values()])
    with pytest.raises(ValueError, match="algorithm version 0"):
        fk.load_frod(_Net(), path)


# -- 2, 3. merged models and checkpoints -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["additive", "factored"])
def test_load_into_a_merged_model(tmp_path, mode):
    net = _trained(mode=mode)
    path = tmp_path / "a.safetensors"
    fk.save_frod(net, path)
    target = _trained(mode=mode, scale=0.05)  # same base, other δ and s, merged
    fk.merge_frod(target)
    fk.load_frod(target, path)
    assert all(layer.merged for layer in fk.frod_layers(target).values())
    _close(target(X), net(X))
    fk.unmerge_frod(target)
    _close(target(X), net(X))


@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("target_merged", [False, True])
def test_checkpoint_taken_while_merged(mode, target_merged):
    net = _trained(mode=mode)
    expected = net(X)
    fk.merge_frod(net)
    state = net.state_dict()
    fresh = _trained(mode=mode, scale=0.0)
    if target_merged:
        fk.merge_frod(fresh)
    fresh.load_state_dict(state)  # strict
    _close(fresh(X), expected)
    assert all(layer.merged == target_merged for layer in fk.frod_layers(fresh).values())
    fk.unmerge_frod(net)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())  # merged or not: one state


# -- 4. the fingerprint covers every element ------------------------------------------------------


@pytest.mark.parametrize("change", ["entry", "column", "last bit"])
def test_fingerprint_sees_any_change(tmp_path, change):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)
    base = _Net()
    with torch.no_grad():
        w = base.blocks[2]["down"].weight
        if change == "entry":
            w[5, 17] += 1e-3
        elif change == "column":
            w[:, 3] *= 1.01
        else:
            w.view(torch.int32)[0, 0] ^= 1
    snap = _snapshot(base)
    with pytest.raises(ValueError, match=r"category 'blocks\.\*\.down': the model's base weights differ"):
        fk.load_frod(base, path)
    _assert_unchanged(base, snap)


def test_base_weights_changed_after_apply_are_not_saved(tmp_path):
    net = _trained()
    with torch.no_grad():
        net.blocks[0]["proj"].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"'blocks\.\*\.proj': its base weights changed after FRoD was applied"):
        fk.save_frod(net, tmp_path / "a.safetensors")


# -- 5. a module reachable under two names -----------------------------------------------------------


class _Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(IN, IN)
        self.b = self.a
        self.c = nn.Linear(IN, IN)

    def forward(self, x):
        return self.c(self.a(x)) + self.b(x)


@pytest.mark.parametrize("targets", [["a"], ["b"], ["a", "b", "c"]])
def test_shared_module_gets_one_frod_layer(tmp_path, targets):
    model = _Shared()
    fk.apply_frod(model, targets, sparse_rate=0.2)
    assert isinstance(model.a, fk.FRoDLinear) and model.a is model.b
    randomise_frod(model, 0.3)
    a_out = X @ model.a.effective_weight().mT + model.a.bias  # one W' under both names
    _close(model(X), model.c(a_out) + a_out)
    path = tmp_path / "a.safetensors"
    fk.save_frod(model, path)
    loaded = fk.load_frod(_Shared(), path)
    assert loaded.a is loaded.b
    _close(loaded(X), model(X))
    fk.unload_frod(loaded)
    assert type(loaded.a) is nn.Linear and loaded.a is loaded.b


# -- 6. apply_frod calls compose ----------------------------------------------------------------------


def test_repeated_apply_frod_composes(tmp_path):
    net = _Net()
    fk.apply_frod(net, ["proj"], sparse_rate=0.2, seed=1)
    summary = fk.apply_frod(net, ["up", "down"], sparse_rate=0.1, seed=2)
    layers = fk.frod_layers(net)
    assert len(layers) == 9 and set(summary.categories) == {"blocks.*.proj", "blocks.*.up", "blocks.*.down"}
    assert all(layer.delta.requires_grad and layer.sparse_values.requires_grad for layer in layers.values())
    assert summary.trainable == sum(layer.num_trainable() for layer in layers.values())
    groups = fk.frod_param_groups(net)
    assert len(groups[0]["params"]) == 9 and len(groups[1]["params"]) == 9
    randomise_frod(net, 0.3)
    net(X).square().sum().backward()
    assert all(layer.delta.grad is not None for layer in layers.values())
    path = tmp_path / "a.safetensors"
    fk.save_frod(net, path)
    loaded = fk.load_frod(_Net(), path)
    _close(loaded(X), net(X))
    rates = {cat: basis.sparse_rate for cat, (basis, _) in fk.model.frod_categories(loaded).items()}
    assert rates == {"blocks.*.proj": 0.2, "blocks.*.up": 0.1, "blocks.*.down": 0.1}


def test_repeated_calls_on_one_category_pattern_get_distinct_names(tmp_path):
    net = _Net()
    fk.apply_frod(net, r"blocks\.0\.proj", sparse_rate=0.2)
    summary = fk.apply_frod(net, r"blocks\.[12]\.proj", sparse_rate=0.2)
    assert set(summary.categories) == {"blocks.*.proj", "blocks.*.proj#2"}
    randomise_frod(net, 0.3)
    path = tmp_path / "a.safetensors"
    fk.save_frod(net, path)
    _close(fk.load_frod(_Net(), path)(X), net(X))


# -- 7. an adapter holds only adapter tensors ----------------------------------------------------------


def test_undeclared_or_frozen_tensors_are_refused(tmp_path):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)
    evil = {"blocks.0.proj.weight": torch.zeros(IN, IN)}
    _rewrite(path, tensors=lambda t: {**t, **evil})
    base = _Net()
    snap = _snapshot(base)
    with pytest.raises(ValueError, match="does not declare, e.g. 'blocks.0.proj.weight'"):
        fk.load_frod(base, path)
    _assert_unchanged(base, snap)
    _rewrite(path, extra=json.dumps(["blocks.0.proj.weight"]))  # declared: still a base weight
    with pytest.raises(ValueError, match="'blocks.0.proj.weight' is a FRoD layer's base weight"):
        fk.load_frod(base, path)
    _assert_unchanged(base, snap)
    sd = {**fk.frod_state_dict(_trained()), "head.weight": torch.zeros(3, IN)}
    frozen_head = _trained()
    with pytest.raises(ValueError, match="'head.weight' is neither a FRoD tensor nor a trainable parameter"):
        fk.load_frod_state_dict(frozen_head, sd)


def test_a_trained_head_travels_with_the_adapter(tmp_path):
    net = _trained()
    net.head.requires_grad_(True)
    with torch.no_grad():
        net.head.weight.mul_(-2.0)
    path = tmp_path / "a.safetensors"
    fk.save_frod(net, path)
    loaded = fk.load_frod(_Net(), path)
    _close(loaded(X), net(X))
    assert loaded.head.weight.requires_grad  # trainable as when saved


# -- 8. refused calls leave the model exactly as it was -------------------------------------------------


@pytest.mark.parametrize(
    "kw,err", [({"backend": "cuda"}, ValueError), ({"path": "diagonal"}, ValueError),
               ({"param_dtype": torch.int32}, TypeError), ({"param_dtype": "float33"}, TypeError),
               ({"mode": "lora"}, ValueError)],
)
def test_refused_apply_frod_changes_nothing(kw, err):
    net = _trained(targets=("proj",))
    snap = _snapshot(net)
    with pytest.raises(err):
        fk.apply_frod(net, ["up"], **kw)
    _assert_unchanged(net, snap)


def test_apply_frod_failing_half_way_is_rolled_back(monkeypatch):
    net = _Net()
    snap = _snapshot(net)
    real, calls = decomposition.joint_decompose, []

    def fail_on_second(weights, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return real(weights, **kw)

    monkeypatch.setattr(fk.categories, "joint_decompose", fail_on_second)
    with pytest.raises(RuntimeError, match="simulated"):
        fk.apply_frod(net, ["proj", "up", "down"])
    _assert_unchanged(net, snap)
    assert not fk.frod_layers(net)


def test_refused_load_into_a_base_model_changes_nothing(tmp_path):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)
    other = _Net(seed=1)
    snap = _snapshot(other)
    with pytest.raises(ValueError, match="base weights differ"):
        fk.load_frod(other, path)
    _assert_unchanged(other, snap)
    # A refusal after FRoD was applied (a tensor of the wrong shape) is rolled back too.
    _rewrite(path, tensors=lambda t: {**t, "blocks.0.proj.delta": torch.zeros(IN + 1)})
    base = _Net()
    snap = _snapshot(base)
    with pytest.raises(ValueError, match="'blocks.0.proj.delta' has shape"):
        fk.load_frod(base, path)
    _assert_unchanged(base, snap)


# -- 9. the decomposition at the edges of float64 ---------------------------------------------------------


@pytest.mark.parametrize("scale", [1e200, 1e-170, 1e-300])
def test_decomposition_of_extreme_weights(scale):
    g = torch.Generator().manual_seed(0)
    unit = [torch.randn(20, 16, generator=g, dtype=torch.float64) for _ in range(3)]
    basis = fk.joint_decompose([u * scale for u in unit])
    reference = fk.joint_decompose(unit)
    assert all(bool(torch.isfinite(t).all()) for t in (basis.V, *basis.U, *basis.lam))
    assert max(basis.errors) < 1e-12 and max(basis.errors) == pytest.approx(max(reference.errors), rel=0.5)
    for i, u in enumerate(unit):  # check in the scaled frame, where the norms are representable
        recon = (basis.U[i] * basis.lam[i]) @ (basis.V / scale).mT
        assert float(torch.linalg.norm(recon - u) / torch.linalg.norm(u)) < 1e-12
    torch.testing.assert_close(basis.lam[0], reference.lam[0], rtol=1e-10, atol=0)


def test_decomposition_refuses_instead_of_looping(monkeypatch):
    monkeypatch.setattr(decomposition, "_PIVOT_RATIO", 2.0)  # no factor can pass: the bound must end it
    with pytest.raises(ValueError, match="Gram matrix of the weights stays singular"):
        fk.joint_decompose([torch.randn(6, 4, dtype=torch.float64)])


def test_float32_basis_overflow_is_refused():
    w = torch.full((256, 4), 1e38) + torch.randn(256, 4) * 1e37
    with pytest.raises(ValueError, match="overflows torch.float32"):
        fk.joint_decompose([w, w * 0.5])


# -- 10. concurrent saves ---------------------------------------------------------------------------------


def test_concurrent_saves_to_one_path(tmp_path):
    net = _trained()
    path = tmp_path / "a.safetensors"
    errors = []

    def save():
        try:
            for _ in range(8):
                fk.save_frod(net, path)
        except Exception as exc:  # collected: an exception in a thread does not fail the test by itself
            errors.append(exc)

    threads = [threading.Thread(target=save) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    _close(fk.load_frod(_Net(), path)(X), net(X))


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "store" / "a.safetensors"
    real.parent.mkdir()
    link = tmp_path / "latest.safetensors"
    net = _trained()
    fk.save_frod(net, real)
    link.symlink_to(real)
    randomise_frod(net, 0.1, seed=5)
    fk.save_frod(net, link)
    assert link.is_symlink() and link.resolve() == real
    _close(fk.load_frod(_Net(), real)(X), net(X))


# -- 11. damaged metadata --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta,match",
    [
        ({"categories": "null"}, "'categories' must be a non-empty JSON object, got NoneType"),
        ({"categories": "[1, 2]"}, "'categories' must be a non-empty JSON object, got list"),
        ({"categories": "3"}, "'categories' must be a non-empty JSON object, got int"),
        ({"categories": '{"x": 3}'}, "category 'x' must be a JSON object, got int"),
        ({"extra": "{}"}, "'extra' must be a JSON list"),
    ],
)
def test_damaged_metadata_is_a_value_error(tmp_path, meta, match):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)
    _rewrite(path, **meta)
    with pytest.raises(ValueError, match=match):
        fk.load_frod(_Net(), path)


@pytest.mark.parametrize("key", ["reg", "layers", "fingerprints", "seed"])
@pytest.mark.parametrize("how", ["missing", "wrong type"])
def test_damaged_category_fields(tmp_path, key, how):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)

    def edit(cats):
        cat = cats["blocks.*.proj"]
        if how == "missing":
            del cat[key]
        else:
            cat[key] = {"a": 1}

    _edit_categories(path, edit)
    with pytest.raises(ValueError, match=r"damaged FRoD metadata: category 'blocks\.\*\.proj'"):
        fk.load_frod(_Net(), path)


def test_missing_metadata_entry(tmp_path):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(), path)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "extra"}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="damaged FRoD metadata: no 'extra' entry"):
        fk.load_frod(_Net(), path)


# -- 12. double backward -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["token", "weight"])
@pytest.mark.parametrize("additive", [True, False])
def test_double_backward(backend, path, additive):
    p = make_problem((2, 3), 7, 9, rate=0.2)
    bias = torch.randn(7, dtype=torch.float64, requires_grad=True)
    weight = p.weight if additive else None

    def f(x, d, v, b):
        return fk.frod_linear(x, weight, b, p.U, p.V, d, p.indices, v, backend=backend, path=path)

    assert torch.autograd.gradgradcheck(f, (p.x, p.delta, p.values, bias))
    # A gradient penalty on dY/dx, against autograd through the reference.
    grads = []
    for fn in (f, lambda x, d, v, b: fk.reference.frod_linear_reference(x, weight, b, p.U, p.V, d, p.indices, v)):
        (gx,) = torch.autograd.grad(fn(p.x, p.delta, p.values, bias).square().sum(), p.x, create_graph=True)
        grads.append(torch.autograd.grad(gx.square().sum(), (p.delta, p.values)))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# -- 13. categories are path pattern and shape ------------------------------------------------------------


def test_top_level_sequential_of_two_shapes(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    x = torch.randn(3, 16)
    before = model(x)
    summary = fk.apply_frod(model, ["0", "2"], sparse_rate=0.1, exact=True)
    assert set(summary.categories) == {"*[32x16]", "*[16x32]"}
    assert torch.equal(model(x), before)
    randomise_frod(model, 0.2)
    path = tmp_path / "a.safetensors"
    fk.save_frod(model, path)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))
    _close(fk.load_frod(fresh, path)(x), model(x))


# -- 14. smaller ones ---------------------------------------------------------------------------------------


def test_empty_weight_is_refused_clearly():
    with pytest.raises(ValueError, match=r"weight 0 has shape \(4, 0\): FRoD needs at least one input"):
        fk.joint_decompose([torch.randn(4, 0)])
    with pytest.raises(ValueError, match=r"category 'lin': weight 0 has shape \(4, 0\)"):
        fk.apply_frod(nn.ModuleDict({"lin": nn.Linear(0, 4)}), ["lin"])


def test_factored_weight_attributes():
    layer = fk.FRoDLinear.from_linear(nn.Linear(6, 5), mode="factored")
    for attr in ("T", "mT", "data", "float", "t", "numpy"):
        with pytest.raises(TypeError, match=f"FactoredWeight.{attr}: a factored FRoDLinear stores no weight"):
            getattr(layer.weight, attr)
    assert getattr(layer.weight, "quant_state", None) is None and not hasattr(layer.weight, "ds_id")
    assert isinstance(layer.weight, FactoredWeight)


def test_numpy_numbers_are_numbers():
    net = _Net()
    summary = fk.apply_frod(net, ["proj"], sparse_rate=np.float32(0.2), seed=np.int64(7), reg=np.float32(1e-3))
    reference = _Net()
    fk.apply_frod(reference, ["proj"], sparse_rate=0.2, seed=7, reg=1e-3)
    assert summary.categories["blocks.*.proj"]["k"] == fk.frod_layers(reference)["blocks.0.proj"].k
    assert torch.equal(fk.frod_layers(net)["blocks.0.proj"].basis.indices,
                       fk.frod_layers(reference)["blocks.0.proj"].basis.indices)


def test_pattern_error_reports_the_users_seed(tmp_path):
    path = tmp_path / "a.safetensors"
    fk.save_frod(_trained(targets=("proj",)), path)
    other = _Net()
    fk.apply_frod(other, ["proj"], sparse_rate=0.2, seed=8)
    with pytest.raises(ValueError, match=r"pattern differs \(adapter k=28, seed 7, rate 0.2; model k=28, seed 8"):
        fk.load_frod(other, path)


class _Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Net()

    def forward(self, x):
        return self.backbone(x)


def test_prefix_mismatch_is_named(tmp_path):
    wrapped = _Wrapper()
    fk.apply_frod(wrapped, ["proj"], sparse_rate=0.2)
    path = tmp_path / "a.safetensors"
    fk.save_frod(wrapped, path)
    with pytest.raises(ValueError, match=r"saved from a model that wraps this one under 'backbone\.'"):
        fk.load_frod(_Net(), path)
    bare = _Net()
    fk.apply_frod(bare, ["proj"], sparse_rate=0.2)
    fk.save_frod(bare, path)
    with pytest.raises(ValueError, match=r"saved without the prefix 'backbone\.' \(load it into "
                                         r"model\.get_submodule\('backbone'\)"):
        fk.load_frod(_Wrapper(), path)
    _close(fk.load_frod(_Wrapper().backbone, path)(X), bare(X))


def test_a_single_layer_adapter(tmp_path):
    torch.manual_seed(0)
    base = nn.Linear(IN, 7)
    layer = fk.FRoDLinear.from_linear(base, sparse_rate=0.2, seed=4)
    randomise_frod(layer, 0.3)
    path = tmp_path / "a.safetensors"
    fk.save_frod(layer, path)
    again = fk.FRoDLinear.from_linear(base, sparse_rate=0.2, seed=4)
    _close(fk.load_frod(again, path)(X), layer(X))
    with pytest.raises(ValueError, match="saved from a FRoDLinear itself"):
        fk.load_frod(nn.Linear(IN, 7), path)
    holder = nn.ModuleDict({"lin": base})  # a bare model holding the same base layer
    with pytest.raises(ValueError, match="saved from a FRoDLinear itself"):
        fk.load_frod(holder, path)
