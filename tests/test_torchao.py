"""FRoD's input form on a torchao int8 weight-only base (``quantize_(model, Int8WeightOnlyConfig())``).

The layer stays an ``nn.Linear`` whose weight is a torchao tensor: the input form wraps it, is exact
at init, trains, exports float merged weights, and its adapters name the int8 base.
"""

from __future__ import annotations

import pytest
import torch

import frod_kernels as fk
from frod_kernels.input_layer import FRoDInputLinear

quantization = pytest.importorskip("torchao.quantization")
pytest.importorskip("transformers")

from _problems import randomise_frod, tiny_bert  # noqa: E402

TARGETS = ["query", "value", "intermediate.dense"]


def _int8_bert(config=None):
    model = tiny_bert(None).eval()
    quantization.quantize_(model, config or quantization.Int8WeightOnlyConfig())
    return model


def test_wraps_an_int8_weight_only_base_exactly_and_trains():
    model = _int8_bert()
    ids = torch.randint(0, 64, (2, 9))
    ref = model(ids).last_hidden_state
    stored = model.encoder.layer[0].attention.self.query.weight.qdata.clone()
    fk.apply_frod(model, TARGETS, mode="input")
    layer = model.encoder.layer[0].attention.self.query
    assert isinstance(layer, FRoDInputLinear) and layer.quantization == "Int8Tensor"
    assert torch.equal(model(ids).last_hidden_state, ref)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        model(ids).last_hidden_state.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model(ids).last_hidden_state, ref)
    assert torch.equal(layer.base_layer.weight.qdata, stored)


def test_export_merge_and_adapters(tmp_path):
    model = _int8_bert()
    fk.apply_frod(model, TARGETS, mode="input")
    randomise_frod(model, 0.05)
    ids = torch.randint(0, 64, (2, 9))
    want = model(ids).last_hidden_state.detach()
    with pytest.raises(ValueError, match=r"quantized \(Int8Tensor\)"):
        fk.merge_frod(model)
    plain = tiny_bert(None).eval()
    plain.load_state_dict(fk.merged_state_dict(model))
    assert float((plain(ids).last_hidden_state - want).abs().max()) < 1e-5
    fk.save_frod(model, tmp_path / "a.safetensors")
    assert torch.equal(fk.load_frod(_int8_bert(), tmp_path / "a.safetensors")(ids).last_hidden_state, want)
    with pytest.raises(ValueError, match=r"quantized \(int8\)"):
        fk.load_frod(tiny_bert(None).eval(), tmp_path / "a.safetensors")


def test_refusals():
    with pytest.raises(ValueError, match="only mode='input' keeps a quantized base"):
        fk.apply_frod(_int8_bert(), TARGETS)
    dynamic = _int8_bert(quantization.Int8DynamicActivationInt8WeightConfig())
    with pytest.raises(TypeError, match="quantizes its input too"):
        fk.apply_frod(dynamic, TARGETS, mode="input")
    assert not fk.frod_layers(dynamic)
