"""apply_frod on transformers models (BERT, Llama, CLIP, GPT-2 with Conv1D) in both modes.

Tiny configs with random weights: exact at init (additive bit-exact, factored up to the
decomposition's rounding), trainable count Σ_layers (n + floor(ρ n²)) (docs/design.md §3), a few
training steps, merge/unmerge/unload, save/load and the cross-mode adapter round trip, and
training with ``gradient_checkpointing_enable()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import frod_kernels as fk
from frod_kernels.pattern import num_sparse_entries

from _problems import randomise_frod, tiny_bert

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

RATE = 0.05


@dataclass
class Spec:
    build: Callable[[], nn.Module]
    targets: list[str]
    categories: int
    loss: Callable[[nn.Module, dict], torch.Tensor]
    output: Callable[[nn.Module, dict], torch.Tensor]
    inputs: Callable[[torch.Generator], dict]


def _ids(g: torch.Generator, vocab: int = 64, shape=(2, 10)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=g)


def _llama() -> nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
        vocab_size=64, max_position_embeddings=16,
    )
    return transformers.LlamaForCausalLM(cfg)


def _clip() -> nn.Module:
    text = {"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 64, "max_position_embeddings": 16}
    vision = {"hidden_size": 24, "intermediate_size": 36, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 16, "patch_size": 8}
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _clip_inputs(g: torch.Generator) -> dict:
    return {"input_ids": _ids(g, shape=(3, 8)), "pixel_values": torch.randn(3, 3, 16, 16, generator=g)}


SPECS = {
    "bert": Spec(
        tiny_bert, ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"], 6,
        loss=lambda m, b: m(**b).loss, output=lambda m, b: m(**b).logits,
        inputs=lambda g: {"input_ids": _ids(g), "labels": torch.randint(0, 3, (2,), generator=g)},
    ),
    "llama": Spec(
        _llama, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 7,
        loss=lambda m, b: m(**b, labels=b["input_ids"]).loss, output=lambda m, b: m(**b).logits,
        inputs=lambda g: {"input_ids": _ids(g)},
    ),
    "clip": Spec(
        _clip, ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"], 12,  # text and vision towers apart
        loss=lambda m, b: m(**b, return_loss=True).loss, output=lambda m, b: m(**b).logits_per_image,
        inputs=_clip_inputs,
    ),
    "gpt2": Spec(
        _gpt2, ["c_attn", "c_proj", "c_fc"], 4,  # attn.c_proj and mlp.c_proj are different categories
        loss=lambda m, b: m(**b, labels=b["input_ids"]).loss, output=lambda m, b: m(**b).logits,
        inputs=lambda g: {"input_ids": _ids(g)},
    ),
}


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SPECS[name].build().eval()


def _frod(name: str, mode: str = "additive", seed: int = 0, exact: bool = False) -> tuple[nn.Module, fk.FRoDSummary]:
    model = _model(name, seed)
    return model, fk.apply_frod(model, SPECS[name].targets, sparse_rate=RATE, seed=11, mode=mode, exact=exact)


def _batch(name: str) -> dict:
    return SPECS[name].inputs(torch.Generator().manual_seed(5))


def _base_shapes(model: nn.Module) -> dict[str, tuple[type, int]]:
    """Targets' (class, in_features) in the base model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            out[name] = (nn.Linear, m.in_features)
        elif isinstance(m, Conv1D):
            out[name] = (Conv1D, m.nx)
    return out


@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("name", list(SPECS))
def test_exact_at_init_and_trainable_count(name, mode):
    base = _model(name)
    batch = _batch(name)
    expected = SPECS[name].output(base, batch)
    shapes = _base_shapes(base)
    model, summary = _frod(name, mode, exact=True)
    layers = fk.frod_layers(model)
    assert len(summary.categories) == SPECS[name].categories
    assert summary.trainable == sum(shapes[n][1] + num_sparse_entries(shapes[n][1], RATE) for n in layers)
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(layer.base_class is shapes[n][0] for n, layer in layers.items())
    got = SPECS[name].output(model, batch)
    if mode == "additive":
        assert torch.equal(got, expected)  # exact=True: bit for bit
        default, _ = _frod(name, mode)  # the basis path where allowed: within rounding
        torch.testing.assert_close(SPECS[name].output(default, batch), expected, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        assert all(layer.weight.dtype == torch.float32 and layer.weight.shape == (layer.out_features, layer.in_features)
                   for layer in layers.values())
        assert not any(n.endswith(".weight") and n.rsplit(".", 1)[0] in layers for n in model.state_dict())


@pytest.mark.parametrize("mode", ["additive", "factored"])
@pytest.mark.parametrize("name", list(SPECS))
def test_train_merge_unload_save_load(name, mode, tmp_path):
    model, _ = _frod(name, mode)
    model.train()
    batch = _batch(name)
    opt = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=2e-2, lr_sparse=2e-2))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = SPECS[name].loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    model.eval()
    y = SPECS[name].output(model, batch)

    # merge / unmerge
    before = {n: m.weight.detach().clone() for n, m in fk.frod_layers(model).items() if mode == "additive"}
    fk.merge_frod(model)
    torch.testing.assert_close(SPECS[name].output(model, batch), y, rtol=1e-4, atol=1e-4)
    fk.unmerge_frod(model)
    assert all(torch.equal(fk.frod_layers(model)[n].weight, w) for n, w in before.items())
    assert torch.equal(SPECS[name].output(model, batch), y)

    # save, then load into a bare base model in either mode
    path = tmp_path / "adapter.safetensors"
    fk.save_frod(model, path)
    for other_mode in ("additive", "factored"):
        fresh = fk.load_frod(_model(name), path, mode=other_mode)
        assert {layer.mode for layer in fk.frod_layers(fresh).values()} == {other_mode}
        tol = 0.0 if other_mode == mode else 1e-4
        torch.testing.assert_close(SPECS[name].output(fresh, batch), y, rtol=tol, atol=tol)

    # unload: the original classes come back with W' and the original state-dict layout
    reference = _model(name).state_dict()
    fk.unload_frod(model, merge=True)
    assert not fk.frod_layers(model)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    assert _base_shapes(model) == _base_shapes(_model(name))
    torch.testing.assert_close(SPECS[name].output(model, batch), y, rtol=1e-4, atol=1e-4)


def test_conv1d_view_shares_the_weight_and_unloads_unmerged():
    base = _model("gpt2")
    conv = base.transformer.h[0].attn.c_attn
    model, _ = _frod("gpt2")
    layer = model.transformer.h[0].attn.c_attn
    assert (layer.in_features, layer.out_features) == (conv.nx, conv.nf)
    torch.testing.assert_close(layer.weight, conv.weight.t(), rtol=0.0, atol=0.0)
    assert layer.weight.stride() == (1, conv.nf)  # a view of the Conv1D storage, not a copy
    randomise_frod(model, 0.05, seed=2)
    fk.unload_frod(model, merge=False)
    unloaded = model.transformer.h[0].attn.c_attn
    assert type(unloaded) is Conv1D and torch.equal(unloaded.weight, conv.weight)
    batch = _batch("gpt2")
    assert torch.equal(SPECS["gpt2"].output(model, batch), SPECS["gpt2"].output(base, batch))


def _train(model: nn.Module, name: str, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    batch = _batch(name)
    opt = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=1e-2, lr_sparse=1e-2))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = SPECS[name].loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in fk.frod_state_dict(model).items()}


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_gradient_checkpointing_trains(name, use_reentrant):
    plain_losses, plain_state = _train(_frod(name)[0].train(), name)
    model = _frod(name)[0].train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # frozen embeddings: see test_checkpointing.py
    assert model.is_gradient_checkpointing
    losses, state = _train(model, name)
    assert losses[-1] < losses[0]
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    for key, value in plain_state.items():
        torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-6, msg=key)
