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
    real = ops.frod_linear_forward

    def spy(*args):
        seen.append(args[-3])
        return real(*args)

    monkeypatch.setattr(ops, "frod_linear_forward", spy)
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
    assert dispatch.PATHS == ("auto", "token", "weight")
