"""PEFT habits in our own API: a config object, modules_to_save, the trainable report, adapter
directories, transformers checkpoints that keep the trained function, the progress bar."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch
from torch import nn

import frod_kernels as fk

from _problems import randomise_frod, tiny_bert

transformers = pytest.importorskip("transformers")

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _classifier() -> nn.Module:
    return tiny_bert(vocab=90, positions=24).eval()


IDS = torch.randint(0, 90, (3, 10), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:
    return model(IDS).logits


def _train(model, steps: int = 2) -> None:
    opt = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=1e-2, lr_sparse=1e-2, lr_other=1e-2))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(IDS).logits, torch.tensor([0, 1, 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_config_modules_to_save_and_directory_round_trip(tmp_path):
    model = _classifier()
    config = fk.FRoDConfig(TARGETS, sparse_rate=0.05, seed=3, modules_to_save=["classifier"])
    fk.apply_frod(model, config)
    assert model.frod_configs == [config]
    assert model.classifier.weight.requires_grad and model.classifier.bias.requires_grad
    head = model.classifier.weight.detach().clone()
    _train(model)
    assert not torch.equal(model.classifier.weight, head)  # the head trained
    expected = _logits(model)
    fk.save_frod(model, tmp_path / "adapter")  # no seed to pass: the config is on the model
    assert (tmp_path / "adapter").is_dir()
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_model.safetensors", "adapter_config.json"}
    stored = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert stored["configs"][0]["modules_to_save"] == ["classifier"] and "classifier.weight" in stored["extra"]
    fresh = fk.load_frod(_classifier(), tmp_path / "adapter")
    torch.testing.assert_close(_logits(fresh), expected, rtol=1e-6, atol=1e-6)
    assert fresh.classifier.weight.requires_grad and fresh.frod_configs == [config]


def test_directory_with_mismatched_config_is_refused(tmp_path):
    model = _classifier()
    fk.apply_frod(model, TARGETS, sparse_rate=0.05)
    fk.save_frod(model, tmp_path / "a/")
    other = _classifier()
    fk.apply_frod(other, ["query"], sparse_rate=0.05)
    fk.save_frod(other, tmp_path / "b/")
    (tmp_path / "a" / "adapter_config.json").write_text((tmp_path / "b" / "adapter_config.json").read_text())
    with pytest.raises(ValueError, match="adapter_config.json and adapter_model.safetensors describe different"):
        fk.load_frod(_classifier(), tmp_path / "a")


def test_modules_to_save_errors():
    with pytest.raises(ValueError, match="modules_to_save entry 'nope' matched no module"):
        fk.apply_frod(_classifier(), TARGETS, modules_to_save=["nope"])
    with pytest.raises(ValueError, match="is both a FRoD target and in modules_to_save"):
        fk.apply_frod(_classifier(), TARGETS, modules_to_save=["query"])
    with pytest.raises(ValueError, match="modules_to_save must be a list"):
        fk.apply_frod(_classifier(), TARGETS, modules_to_save="classifier")


def test_trainable_report_counts_what_trains(capsys):
    model = _classifier()
    summary = fk.apply_frod(model, TARGETS, sparse_rate=0.05)
    trainable, total = fk.trainable_parameters(model)
    assert trainable == summary.trainable
    model.classifier.requires_grad_(True)  # unfrozen after the fact: counted
    head = sum(p.numel() for p in model.classifier.parameters())
    assert fk.trainable_parameters(model) == (trainable + head, total)
    fk.print_trainable_parameters(model)
    assert f"trainable params: {trainable + head:,d} || all params: {total:,d}" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("merged", [False, True])
def test_save_pretrained_keeps_the_trained_function(tmp_path, mode, merged):
    model = _classifier()
    fk.apply_frod(model, TARGETS, sparse_rate=0.05, mode=mode, modules_to_save=["classifier"])
    randomise_frod(model, 0.2)
    if merged:
        fk.merge_frod(model)
    expected = _logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fk.save_pretrained(model, tmp_path / "hf")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # model unchanged
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert not fk.frod_layers(reloaded)
    torch.testing.assert_close(_logits(reloaded), expected, rtol=1e-5, atol=1e-5)


def test_plain_save_pretrained_writes_a_frod_checkpoint(tmp_path):
    """model.save_pretrained (what the HF Trainer calls) keeps the adapter every way back: from_pretrained
    gives the trained function, load_frod the adapter, load_state_dict the exact δ and s."""
    model = _classifier()
    fk.apply_frod(model, TARGETS, sparse_rate=0.05, modules_to_save=["classifier"])
    randomise_frod(model, 0.2)
    expected = _logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "ckpt" / "adapter_config.json").exists()  # transformers would read a PEFT adapter
    plain = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "ckpt").eval()
    assert not fk.frod_layers(plain)
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)
    fresh = fk.load_frod(_classifier(), tmp_path / "ckpt")
    assert torch.equal(_logits(fresh), expected)
    pickle.loads(pickle.dumps(model))  # the guard does not stop the model from pickling
    fk.unload_frod(model)
    assert "save_pretrained" not in vars(model)


def test_conv1d_merged_state_dict_layout():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=80, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    fk.apply_frod(model, ["c_attn", "c_fc"], sparse_rate=0.05)
    randomise_frod(model, 0.2)
    expected = model(IDS % 80).logits
    plain = transformers.GPT2LMHeadModel(cfg).eval()
    plain.load_state_dict(fk.merged_state_dict(model))
    torch.testing.assert_close(plain(IDS % 80).logits, expected, rtol=1e-5, atol=1e-5)


def test_progress_bar(capsys):
    pytest.importorskip("tqdm")
    fk.apply_frod(_classifier(), TARGETS, sparse_rate=0.05, progress=True)
    err = capsys.readouterr().err
    assert "apply_frod" in err and "6/6" in err
    fk.apply_frod(_classifier(), TARGETS, sparse_rate=0.05)  # not a terminal: silent
    assert capsys.readouterr().err == ""
