"""frod_kernels.peft against PEFT's own FRoD (peft.FrodConfig): same function, gradients, steps, files.

Small random BERT-, Llama- and GPT-2-like transformers models built from configs (no hub access).
Every comparison runs PEFT's own code path on a copy of the same PEFT model.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import warnings

import pytest
import torch

peft = pytest.importorskip("peft", reason="frod_kernels.peft needs PEFT (pip install 'peft>=0.21')")
if not hasattr(peft, "FrodConfig"):
    pytest.skip(f"peft {peft.__version__} has no FrodConfig (need >= 0.21)", allow_module_level=True)
transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import FrodConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.frod.layer import Linear as PeftFrodLinear  # noqa: E402

import frod_kernels.peft as fkp  # noqa: E402
from frod_kernels import FRoDLinear, frod_layers, unload_frod  # noqa: E402

TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}
VOCAB = 97


def _bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   classifier_dropout=0.0)


def _bert_classifier() -> tuple[torch.nn.Module, torch.nn.Module]:
    """A BERT classifier and PEFT's FRoD around a copy of it, with a trainable bias and head (modules_to_save)."""
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(_bert_config())
    return base, _peft_model(base, "bert", bias="frod_only", modules_to_save=["classifier"])


def _base(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "bert":
        return transformers.BertModel(_bert_config(), add_pooling_layer=False)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
        return transformers.LlamaModel(cfg)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2Model(cfg)


def _peft_model(base: torch.nn.Module, kind: str, seed: int = 1, **config) -> torch.nn.Module:
    """PEFT's FRoD around a copy of ``base`` with trained-looking (random, seeded) λ_l and s."""
    config = {"target_modules": TARGETS[kind], "sparse_rate": 0.05, "progressbar": False, **config}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for GPT-2
        model = get_peft_model(copy.deepcopy(base), FrodConfig(**config))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(seed))


def _out(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    y = _out(model, ids)
    (y.sin().sum()).backward()
    return y.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 2e-5, floor: float = 1e-12) -> None:
    """Equal to fp32 rounding: max abs error relative to the tensor's scale (at least ``floor``)."""
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), floor)
    err = float((a - b).abs().max()) / scale
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


def _close_grads(grads: dict[str, torch.Tensor], grads_ref: dict[str, torch.Tensor], tol: float = 1e-4) -> None:
    """Every gradient equal to fp32 rounding, relative to its own scale or 1e-3 of the largest (some, like a
    key bias under softmax, are zero up to rounding)."""
    assert grads.keys() == grads_ref.keys()
    floor = 1e-3 * max(float(g.abs().max()) for g in grads_ref.values())
    for name in grads_ref:
        try:
            _close(grads[name], grads_ref[name], tol, floor)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def _accelerated_pair(kind: str, **config) -> tuple[torch.nn.Module, torch.nn.Module]:
    model = _peft_model(_base(kind), kind, **config)
    ref = copy.deepcopy(model)
    before = [(n, id(p)) for n, p in model.named_parameters()] + [(n, id(b)) for n, b in model.named_buffers()]
    assert fkp.accelerate(model) == sum(isinstance(m, PeftFrodLinear) for m in ref.modules()) > 0
    # the same parameter and buffer objects under the same names: optimizers and state dicts are unaffected
    assert before == [(n, id(p)) for n, p in model.named_parameters()] + [(n, id(b)) for n, b in model.named_buffers()]
    return model, ref


def test_peft_import_is_the_top_level_package():
    assert sys.modules["peft"] is peft and "frod_kernels" not in peft.__file__
    assert fkp._peft_frod() is sys.modules["peft.tuners.frod"]
    assert issubclass(fkp.AcceleratedFrodLinear, PeftFrodLinear)


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_accelerated_matches_peft(kind):
    model, ref = _accelerated_pair(kind)
    assert model.state_dict().keys() == ref.state_dict().keys()
    layers = [m for m in model.modules() if isinstance(m, PeftFrodLinear)]
    assert all(type(m) is fkp.AcceleratedFrodLinear for m in layers)
    # PEFT's patterns are unsorted: the permutation of the values is exercised.
    idx = layers[0].frod_s_indices["default"]
    assert not bool(((idx[0] * 10**6 + idx[1]).diff() > 0).all())
    ids = _ids()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fkp.FrodFallbackWarning)
        for _ in range(2):  # forward, backward, one AdamW step, and again after the step
            y, grads = _loss_and_grads(model, ids)
            y_ref, grads_ref = _loss_and_grads(ref, ids)
            _close(y, y_ref)
            assert len(grads) >= 2 * len(layers)
            _close_grads(grads, grads_ref)
            opt.step()
            opt_ref.step()
        for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
            _close(p.detach(), q.detach(), 1e-5)
        with torch.no_grad():
            _close(_out(model, ids), _out(ref, ids))


def test_trainable_bias_and_head_and_save_reload(tmp_path):
    """bias="frod_only" + modules_to_save: their gradients too; save_pretrained → from_pretrained; merge."""
    base, model = _bert_classifier()
    ref = copy.deepcopy(model)
    fkp.accelerate(model)
    ids = _ids(1)
    y, grads = _loss_and_grads(model, ids)
    y_ref, grads_ref = _loss_and_grads(ref, ids)
    _close(y, y_ref)
    assert any(n.endswith("base_layer.bias") for n in grads) and any("classifier" in n for n in grads)
    _close_grads(grads, grads_ref)
    model.save_pretrained(tmp_path / "adapter")  # from the accelerated model: a normal PEFT adapter
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        _close(_out(reloaded, ids), y_ref)
        fkp.accelerate(reloaded)
        _close(_out(reloaded, ids), y_ref)
        merged = model.merge_and_unload()
        merged_ref = ref.merge_and_unload()
        assert not any(isinstance(m, PeftFrodLinear) for m in merged.modules())
        _close(_out(merged, ids), _out(merged_ref, ids), 1e-6)
        _close(_out(merged, ids), y_ref, 1e-4)  # merged W' (one rounding) vs the factored product


@pytest.mark.parametrize("kind", ["llama"])
def test_save_reload_merge_llama(kind, tmp_path):
    model, ref = _accelerated_pair(kind)
    ids = _ids(2)
    with torch.no_grad():
        y_ref = _out(ref, ids)
        model.save_pretrained(tmp_path)
        reloaded = PeftModel.from_pretrained(_base(kind), tmp_path)
        _close(_out(reloaded, ids), y_ref)
        _close(_out(model.merge_and_unload(), ids), _out(ref.merge_and_unload(), ids), 1e-6)


def _record_fallbacks(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, fkp.FrodFallbackWarning)]


def test_fallback_dropout():
    model, ref = _accelerated_pair("bert", frod_dropout=0.1)
    ids = _ids()

    def both():
        torch.manual_seed(5)
        a = _out(model, ids)
        torch.manual_seed(5)
        return a, _out(ref, ids)

    (a, b), notes = _record_fallbacks(both)
    _close(a, b, 1e-6)
    assert len(notes) == 1 and "frod_dropout" in notes[0]  # once, not once per layer or call
    _, notes = _record_fallbacks(both)
    assert notes == []
    model.eval()
    ref.eval()
    (a, b), notes = _record_fallbacks(both)  # dropout is off in eval: accelerated, no notice
    assert notes == []
    _close(a, b)


def test_fallback_adapters_disabled_merged_and_several():
    model, ref = _accelerated_pair("bert")
    ids = _ids()
    with torch.no_grad():
        with model.disable_adapter(), ref.disable_adapter():
            (a, b), notes = _record_fallbacks(lambda: (_out(model, ids), _out(ref, ids)))
        _close(a, b, 0)
        assert len(notes) == 1 and "disabled" in notes[0]
        model.merge_adapter()
        ref.merge_adapter()
        (a, b), notes = _record_fallbacks(lambda: (_out(model, ids), _out(ref, ids)))
        _close(a, b, 0)
        assert len(notes) == 1 and "merged" in notes[0]
        model.unmerge_adapter()
        ref.unmerge_adapter()
        for m in (model, ref):
            m.add_adapter("other", FrodConfig(target_modules=["query"], sparse_rate=0.05, progressbar=False))
            m.base_model.set_adapter(["default", "other"])
        (a, b), notes = _record_fallbacks(lambda: (_out(model, ids), _out(ref, ids)))
        _close(a, b, 1e-6)
        assert any("several active adapters" in n for n in notes)
        for m in (model, ref):  # one adapter again, a new one: accelerated
            m.base_model.set_adapter("other")
        (a, b), notes = _record_fallbacks(lambda: (_out(model, ids), _out(ref, ids)))
        _close(a, b)
        assert not any("several" in n for n in notes)


def test_unusual_pattern_diagonal_and_duplicates():
    """A pattern with a diagonal entry and a duplicate (PEFT's coalesce sums it) maps onto our sorted Ω."""
    model, ref = _accelerated_pair("bert")
    ids = _ids()
    with torch.no_grad():
        _close(_out(model, ids), _out(ref, ids))  # fills the cache with PEFT's own pattern first
        for m in (model, ref):
            idx = m.base_model.frod_s_indices["self_query"]["default"]
            idx[:, 0] = 3  # (3, 3): on the diagonal, added to λ_l[3]
            idx[:, 1] = idx[:, 2]  # a duplicate of entry 2
    y, grads = _loss_and_grads(model, ids)  # the cache sees the in-place change
    y_ref, grads_ref = _loss_and_grads(ref, ids)
    _close(y, y_ref)
    _close_grads(grads, grads_ref)


def test_omega_map_unit():
    n = 6
    idx = torch.tensor([[4, 0, 2, 2, 1], [1, 3, 2, 5, 0]])  # unsorted, one diagonal entry (2, 2)
    omega = fkp.OmegaMap.build(idx, n)
    assert omega.pattern.indices.tolist() == [[0, 1, 2, 4], [3, 0, 5, 1]]
    lam, s = torch.arange(n, dtype=torch.float64), torch.tensor([10.0, 11, 12, 13, 14], dtype=torch.float64)
    diag, values = omega.apply(lam, s)
    assert values.tolist() == [11, 14, 13, 10] and diag.tolist() == [0, 1, 14, 3, 4, 5]
    ident = fkp.OmegaMap.build(torch.tensor([[0, 1], [1, 0]]), 2)
    s2 = s[:2]
    assert ident.gather is None and ident.apply(lam[:2], s2)[1] is s2
    with pytest.raises(ValueError, match="out of range"):
        fkp.OmegaMap.build(torch.tensor([[0], [7]]), n)


def test_deaccelerate_and_errors():
    model, ref = _accelerated_pair("bert")
    assert fkp.is_accelerated(model) and not fkp.is_accelerated(ref)
    assert fkp.deaccelerate(model) == 12 and not fkp.is_accelerated(model)
    assert all(type(m) is PeftFrodLinear for m in model.modules() if isinstance(m, PeftFrodLinear))
    with torch.no_grad():
        _close(_out(model, _ids()), _out(ref, _ids()), 0)
    with pytest.raises(ValueError, match="no PEFT FRoD layer"):
        fkp.accelerate(_base("bert"))
    with pytest.raises(ValueError, match="backend must be one of"):
        fkp.accelerate(model, backend="cuda")


def test_pickle_and_deepcopy_keep_acceleration():
    import pickle

    model, ref = _accelerated_pair("bert")
    with torch.no_grad():
        _close(_out(model, _ids()), _out(ref, _ids()))  # fills the caches
        for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            assert fkp.is_accelerated(clone)
            layer = clone.base_model.model.encoder.layer[0].attention.self.query
            assert layer._frod_accel.cache == {} and layer._frod_name.endswith("layer.0.attention.self.query")
            _close(_out(clone, _ids()), _out(ref, _ids()))


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_to_frod_layers_same_function(kind):
    peft_model = _peft_model(_base(kind), kind)
    ref = copy.deepcopy(peft_model)
    n_layers = sum(isinstance(m, PeftFrodLinear) for m in ref.modules())
    ids = _ids()
    ours = fkp.to_frod_layers(peft_model)
    assert len(frod_layers(ours)) == n_layers
    assert not any(isinstance(m, PeftFrodLinear) for m in ours.modules())
    layer = next(iter(frod_layers(ours).values()))
    assert layer.mode == "factored" and layer.basis.source == "given" and layer.basis.fingerprint
    assert layer.delta.requires_grad and layer.sparse_values.requires_grad and not layer.U.requires_grad
    y, grads = _loss_and_grads(ours, ids)
    y_ref, _ = _loss_and_grads(ref, ids)
    _close(y, y_ref)
    assert sum(n.endswith(("delta", "sparse_values")) for n in grads) == 2 * n_layers
    with torch.no_grad():
        merged_ref = _out(ref.merge_and_unload(), ids)
        unloaded = unload_frod(ours, merge=True)
        if kind == "gpt2":
            assert type(unloaded.h[0].attn.c_attn).__name__ == "Conv1D"
        _close(_out(unloaded, ids), merged_ref, 1e-5)


def test_to_frod_layers_additive_and_errors():
    peft_model = _peft_model(_base("llama"), "llama")
    ref = copy.deepcopy(peft_model)
    ours = fkp.to_frod_layers(peft_model, mode="additive")
    with torch.no_grad():
        _close(_out(ours, _ids()), _out(ref, _ids()), 1e-4)  # up to the decomposition residual
    with pytest.raises(TypeError, match="PeftModel built with peft.FrodConfig"):
        fkp.to_frod_layers(ours)
    ref.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        fkp.to_frod_layers(ref)


def test_from_peft_adapter_without_peft(tmp_path):
    base, peft_model = _bert_classifier()
    peft_model.save_pretrained(tmp_path)
    ids = _ids(3)
    with torch.no_grad():
        y_ref = _out(peft_model, ids)
        fresh = copy.deepcopy(base)
        ours = fkp.from_peft_adapter(fresh, tmp_path)
        assert ours is fresh and len(frod_layers(ours)) == 13  # 2 x 6 encoder linears + the pooler's dense
        _close(_out(ours, ids), y_ref)
    assert ours.classifier.weight.requires_grad
    layer = ours.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, FRoDLinear) and layer.bias.requires_grad
    # save_projection=False holds no V or Ω: a clear refusal
    cfg_file = tmp_path / "adapter_config.json"
    off = tmp_path / "noproj"
    peft_model.peft_config["default"].save_projection = False
    peft_model.save_pretrained(off)
    assert not json.loads((off / "adapter_config.json").read_text())["save_projection"]
    with pytest.raises(ValueError, match="save_projection=False"):
        fkp.from_peft_adapter(copy.deepcopy(base), off)
    with pytest.raises(FileNotFoundError):
        fkp.from_peft_adapter(copy.deepcopy(base), tmp_path / "missing")
    assert cfg_file.exists()


def test_peft_category_matches_peft():
    from peft.tuners.frod.model import _category_from_key

    for key in ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.output.dense",
                "encoder.layer.3.output.dense", "model.layers.1.mlp.down_proj", "h.0.mlp", "lm_head"]:
        assert fkp.peft_category(key) == _category_from_key(key)


def test_peft_u_lambda_matches_peft():
    peft_model = get_peft_model(_base("bert"), FrodConfig(target_modules=["value"], progressbar=False))
    layer = peft_model.base_model.model.encoder.layer[1].attention.self.value
    U, lam = fkp.peft_u_lambda(layer.frod_V["default"], layer.get_base_layer().weight)
    assert torch.equal(U, layer.frod_U["default"]) and torch.equal(lam, layer.frod_lambda_l["default"])


def test_peft_bench_tiny(tmp_path):
    from benchmarks.peft_bench import main

    out = tmp_path / "peft.json"
    assert main(["--tiny", "--no-progress", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert set(methods) == {"peft_frod", "peft_frod_accelerated", "frod", "lora", "full"}
    assert all(m["ms"] > 0 for m in methods.values())
    assert "load_average_1min" in result["machine"] and "load_average_after" in result
    # the accelerated step computes PEFT's loss
    for key in ("first_loss", "last_loss"):  # same parameters, batch and dropout masks, step after step
        assert abs(methods["peft_frod_accelerated"][key] - methods["peft_frod"][key]) < 1e-4
    assert methods["peft_frod_accelerated"]["paired_ratio_to_peft_frod_accelerated"] == 1.0


@pytest.mark.parametrize("argv", [["--tiny", "--threads", "1"], ["--threads", "1", "--tiny"]])
def test_peft_bench_options_in_either_order(argv):
    from benchmarks.peft_bench import build_parser

    args = build_parser().parse_args([*argv, "--repeats", "3"])
    assert args.tiny and args.threads == 1 and args.repeats == 3 and args.batch == 16


def test_bfloat16_and_autocast():
    model, ref = _accelerated_pair("llama")
    model.to(torch.bfloat16)
    ref.to(torch.bfloat16)  # PEFT densifies S in half precision; we keep it sparse
    with warnings.catch_warnings():
        warnings.simplefilter("error", fkp.FrodFallbackWarning)
        y, grads = _loss_and_grads(model, _ids())
        y_ref, grads_ref = _loss_and_grads(ref, _ids())
        assert y.dtype == torch.bfloat16
        _close(y, y_ref, 2e-2)
        _close_grads(grads, grads_ref, 5e-2)
        model, ref = _accelerated_pair("bert")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            y, y_ref = _out(model, _ids()), _out(ref, _ids())
        assert y.dtype == y_ref.dtype == torch.float32  # PEFT casts back to x's dtype; so do we
        _close(y, y_ref, 2e-2)


def test_converted_model_with_our_adapter_files(tmp_path):
    """save_frod of a converted model: refused by a bare model (V is PEFT's, not ours to recompute), loaded
    by the same model converted again (basis and base-weight fingerprint checked)."""
    from frod_kernels import load_frod, save_frod

    base = _base("bert")
    peft_model = _peft_model(base, "bert")
    ours = fkp.to_frod_layers(copy.deepcopy(peft_model))
    with torch.no_grad():
        for layer in frod_layers(ours).values():
            layer.sparse_values.add_(0.01)
    save_frod(ours, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="basis given by the caller"):
        load_frod(_base("bert"), tmp_path / "a.safetensors")
    again = fkp.to_frod_layers(copy.deepcopy(peft_model))
    load_frod(again, tmp_path / "a.safetensors")
    with torch.no_grad():
        _close(_out(again, _ids()), _out(ours, _ids()), 0)
