"""apply_frod and the model-level helpers on transformers models and a plain nn.Module."""

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.pattern import num_sparse_entries

from _problems import randomise_frod, tiny_bert

transformers = pytest.importorskip("transformers")

BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _bert(seed=0):
    return tiny_bert(None, hidden=48, layers=3, intermediate=80, vocab=120, positions=32, seed=seed).eval()


def _llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
        vocab_size=100, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("builder,targets,n_categories", [(_bert, BERT_TARGETS, 6), (_llama, LLAMA_TARGETS, 7)])
def test_apply_frod_on_transformers(builder, targets, n_categories):
    model = builder()
    ids = torch.randint(0, 100, (2, 11))
    out = (lambda m: m(ids).last_hidden_state) if builder is _bert else (lambda m: m(ids).logits)
    before = out(model)
    linears = {name: m.weight.shape for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    summary = fk.apply_frod(model, targets, sparse_rate=0.05, seed=0, exact=True)

    layers = fk.frod_layers(model)
    assert len(summary.categories) == n_categories and summary.layers == len(layers)
    # docs/design.md §3: n + floor(ρ n²) per layer, independent of o.
    expected = sum(linears[name][1] + num_sparse_entries(linears[name][1], 0.05) for name in layers)
    assert summary.trainable == expected
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    assert summary.percent == pytest.approx(100 * expected / summary.total)
    for cat, info in summary.categories.items():
        assert "*" in cat and info["max_error"] < 1e-10
        assert all(layers[name].basis is layers[info["layers"][0]].basis for name in info["layers"])
    # Categories keep the full path: attention.output.dense and output.dense stay apart.
    assert torch.equal(out(model), before)  # exact at init

    randomise_frod(model, 0.2)
    changed = out(model)
    assert not torch.allclose(changed, before)
    loss = changed.square().mean()
    loss.backward()
    assert all(layer.delta.grad is not None and layer.sparse_values.grad.abs().sum() > 0 for layer in layers.values())


def test_merge_unmerge_unload_on_model():
    model = _bert()
    fk.apply_frod(model, BERT_TARGETS, sparse_rate=0.05)
    randomise_frod(model, 0.2)
    ids = torch.randint(0, 100, (2, 9))
    y = model(ids).last_hidden_state
    weights = {n: m.weight.detach().clone() for n, m in fk.frod_layers(model).items()}
    fk.merge_frod(model)
    torch.testing.assert_close(model(ids).last_hidden_state, y, rtol=1e-4, atol=1e-4)
    fk.unmerge_frod(model)
    assert all(torch.equal(m.weight, weights[n]) for n, m in fk.frod_layers(model).items())
    assert torch.equal(model(ids).last_hidden_state, y)
    fk.unload_frod(model, merge=True)
    assert not fk.frod_layers(model)
    assert all(type(model.get_submodule(n)) is nn.Linear for n in weights)
    torch.testing.assert_close(model(ids).last_hidden_state, y, rtol=1e-4, atol=1e-4)


def test_unload_without_merge_gives_back_the_base_model():
    model = _bert()
    ids = torch.randint(0, 100, (2, 9))
    base = model(ids).last_hidden_state
    fk.apply_frod(model, BERT_TARGETS)
    randomise_frod(model, 0.2)
    fk.unload_frod(model, merge=False)
    assert torch.equal(model(ids).last_hidden_state, base)


def test_plain_module_regex_targets_and_param_groups():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10)),
        nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 10)),
        nn.Linear(10, 3),
    )
    x = torch.randn(4, 10)
    y = model(x)
    summary = fk.apply_frod(model, r"\d+\.[02]", sparse_rate=0.1, exact=True)
    assert set(summary.categories) == {"*.0", "*.2"}
    assert type(model[2]) is nn.Linear  # the head is untouched...
    model[2].weight.requires_grad_(True)  # ...and can be unfrozen for training
    assert torch.equal(model(x), y)
    groups = fk.frod_param_groups(model, lr_delta=1e-3, lr_sparse=1e-4, lr_other=1e-2)
    assert [g["lr"] for g in groups] == [1e-3, 1e-4, 1e-2]
    assert [len(g["params"]) for g in groups] == [4, 4, 1]
    opt = torch.optim.AdamW(groups)
    model(x).square().sum().backward()
    opt.step()
    assert not torch.equal(model(x), y)


def test_target_errors():
    model = _bert()
    with pytest.raises(ValueError, match="matched no module"):
        fk.apply_frod(model, ["does_not_exist"])
    with pytest.raises(TypeError, match="not an nn.Linear"):
        fk.apply_frod(model, ["word_embeddings"])
    with pytest.raises(ValueError, match="sparse_rate"):
        fk.apply_frod(model, ["query"], sparse_rate=-0.5)
    fk.apply_frod(model, ["query"])
    with pytest.raises(ValueError, match="already"):
        fk.apply_frod(model, ["query"])


def test_save_load_round_trip(tmp_path):
    model = _bert(seed=0)
    fk.apply_frod(model, BERT_TARGETS, sparse_rate=0.05, seed=7)
    randomise_frod(model, 0.2)
    ids = torch.randint(0, 100, (2, 9))
    y = model(ids).last_hidden_state
    path = tmp_path / "adapter.safetensors"
    fk.save_frod(model, path)
    sd = fk.frod_state_dict(model)
    assert all(k.endswith(("delta", "sparse_values")) for k in sd)

    # Into a bare copy of the base model: FRoD is re-applied from the file, U and V recomputed.
    fresh = _bert(seed=0)
    fk.load_frod(fresh, path)
    assert torch.equal(fresh(ids).last_hidden_state, y)
    for name, layer in fk.frod_layers(fresh).items():
        other = fk.frod_layers(model)[name]
        assert torch.equal(layer.U, other.U) and torch.equal(layer.basis.V, other.basis.V)

    # Into a model that already has the same FRoD layers, through the in-memory state dict.
    again = _bert(seed=0)
    fk.apply_frod(again, BERT_TARGETS, sparse_rate=0.05, seed=7)
    fk.load_frod_state_dict(again, sd)
    assert torch.equal(again(ids).last_hidden_state, y)


def test_load_into_wrong_model_is_refused(tmp_path):
    model = _bert(seed=0)
    fk.apply_frod(model, BERT_TARGETS, sparse_rate=0.05, seed=7)
    path = tmp_path / "adapter.safetensors"
    fk.save_frod(model, path)
    with pytest.raises(ValueError, match="base weights differ"):
        fk.load_frod(_bert(seed=1), path)
    other_shape = tiny_bert(None, layers=3, intermediate=80, vocab=120, positions=32)
    with pytest.raises(ValueError, match="shape|differ"):
        fk.load_frod(other_shape, path)
    different_pattern = _bert(seed=0)
    fk.apply_frod(different_pattern, BERT_TARGETS, sparse_rate=0.05, seed=8)
    with pytest.raises(ValueError, match="pattern"):
        fk.load_frod(different_pattern, path)
    (tmp_path / "junk.safetensors").write_bytes(b"not an adapter at all")
    with pytest.raises(ValueError, match="safetensors"):
        fk.load_frod(_bert(seed=0), tmp_path / "junk.safetensors")
