"""FRoD on a quantized base: a transformers Llama loaded with bitsandbytes 4-bit (QLoRA's workflow), on CPU.

The input form wraps the Linear4bit layers as they are: bit-exact at init, equal to FRoD on the
dequantized float base, trains through the HF Trainer with checkpoints and resume, exports float
merged weights, and its adapters name the quantized base they were trained on.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import frod_kernels as fk
from frod_kernels.input_layer import FRoDInputLinear

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load(path, bits: int | None = 4, quant_type: str = "nf4"):
    kw = {}
    if bits == 4:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32)
    elif bits == 8:
        kw["quantization_config"] = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **kw).eval()


def _ids(seed: int = 0):
    return torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(seed))


def _trained(path, scale: float = 0.05):
    model = _load(path)
    fk.apply_frod(model, TARGETS, mode="input")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in fk.frod_layers(model).values():
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * scale)
            layer.sparse_values.copy_(torch.randn(layer.sparse_values.shape, generator=g) * scale)
    return model


def _packed(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}


def test_apply_is_bit_exact_at_init_and_leaves_the_base_untouched(llama_dir):
    model = _load(llama_dir)
    ids = _ids()
    ref = model(ids).logits
    packed = _packed(model)
    summary = fk.apply_frod(model, TARGETS, mode="input")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FRoDInputLinear) and layer.quantization == "nf4"
    assert type(layer.base_layer).__name__ == "Linear4bit"
    assert torch.equal(model(ids).logits, ref)
    assert all(c["disabled"] == 0 for c in summary.categories.values())
    after = {n.replace(".base_layer", ""): p for n, p in _packed(model).items()}
    assert after.keys() == packed.keys() and all(torch.equal(after[n], packed[n]) for n in packed)


def test_equals_frod_on_the_dequantized_float_base(llama_dir):
    quantized = _trained(llama_dir)
    plain = _load(llama_dir, bits=None)
    with torch.no_grad():  # the float model with the dequantized weights: the function the 4-bit base computes
        for name, layer in fk.frod_layers(quantized).items():
            plain.get_submodule(name).weight.copy_(layer.base_weight)
    fk.apply_frod(plain, TARGETS, mode="additive", exact=True)
    fk.load_frod_state_dict(plain, fk.frod_state_dict(quantized))
    ids = _ids()
    want = plain(ids).logits
    got = quantized(ids).logits.detach()
    want = want.detach()
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_training_moves_only_delta_and_s(llama_dir):
    model = _load(llama_dir)
    fk.apply_frod(model, TARGETS, mode="input")
    packed = _packed(model)
    opt = torch.optim.AdamW(fk.frod_param_groups(model, lr_delta=1e-2, lr_sparse=1e-2))
    ids = _ids()
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, packed[n]) for n, p in _packed(model).items())


def test_merge_is_refused_and_unload_gives_float_or_the_base(llama_dir):
    model = _trained(llama_dir)
    ids = _ids()
    want = model(ids).logits
    layer = model.model.layers[1].mlp.down_proj
    with pytest.raises(ValueError, match="quantized .nf4."):
        fk.merge_frod(model)
    assert not any(m.merged for m in fk.frod_layers(model).values())
    assert torch.equal(model(ids).logits, want)
    base = layer.base_layer
    copy = _trained(llama_dir)
    fk.unload_frod(copy, merge=True)
    lin = copy.model.layers[1].mlp.down_proj
    assert type(lin) is torch.nn.Linear and lin.weight.dtype == torch.float32
    assert float((copy(ids).logits - want).abs().max().detach()) < 1e-5
    assert copy.is_quantized  # given back
    fk.unload_frod(model, merge=False)
    assert model.model.layers[1].mlp.down_proj is base


def test_save_pretrained_writes_a_float_checkpoint_and_resumes_exactly(llama_dir, tmp_path):
    model = _trained(llama_dir)
    ids = _ids()
    want = model(ids).logits
    model.save_pretrained(tmp_path / "ckpt")
    assert model.hf_quantizer is not None and "quantization_config" in model.config.to_dict()  # unchanged
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert float((plain(ids).logits - want).abs().max().detach()) < 1e-5
    from safetensors.torch import load_file

    resumed = _load(llama_dir)
    fk.apply_frod(resumed, TARGETS, mode="input")
    result = resumed.load_state_dict(load_file(tmp_path / "ckpt" / "model.safetensors"), strict=False)
    assert not result.unexpected_keys and not result.missing_keys
    assert torch.equal(resumed(ids).logits, want)
    again = _load(llama_dir)
    fk.apply_frod(again, TARGETS, mode="input")
    again.load_state_dict(model.state_dict())  # the FRoD model's own state dict, quantization state included
    assert torch.equal(again(ids).logits, want)


def test_adapter_names_its_quantized_base(llama_dir, tmp_path):
    model = _trained(llama_dir)
    ids = _ids()
    want = model(ids).logits
    fk.save_frod(model, tmp_path / "a.safetensors")
    loaded = fk.load_frod(_load(llama_dir), tmp_path / "a.safetensors")
    assert torch.equal(loaded(ids).logits, want)
    with pytest.raises(ValueError, match=r"quantized \(4-bit\)"):
        fk.load_frod(_load(llama_dir, bits=None), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="differ"):
        fk.load_frod(_load(llama_dir, quant_type="fp4"), tmp_path / "a.safetensors")
    with pytest.warns(fk.FRoDBaseMismatchWarning, match="allow_other_base"):
        other = fk.load_frod(_load(llama_dir, bits=None), tmp_path / "a.safetensors", allow_other_base=True)
    float_base = _load(llama_dir, bits=None)(ids).logits
    got = other(ids).logits
    assert torch.isfinite(got).all() and not torch.equal(got, float_base)  # δ and s act, in the float base's basis


def test_refusals_leave_the_model_as_it_was(llama_dir):
    model = _load(llama_dir)
    packed = _packed(model)
    with pytest.raises(ValueError, match="only mode='input' keeps a quantized base"):
        fk.apply_frod(model, TARGETS)
    assert not fk.frod_layers(model) and all(torch.equal(p, packed[n]) for n, p in _packed(model).items())
    int8 = _load(llama_dir, bits=8)
    with pytest.raises(TypeError, match="quantizes its input"):
        fk.apply_frod(int8, TARGETS, mode="input")
    assert not fk.frod_layers(int8)


def test_hf_trainer_trains_checkpoints_and_resumes(llama_dir, tmp_path):
    def run(output, steps, resume=None):
        model = _load(llama_dir)
        fk.apply_frod(model, TARGETS, mode="input")
        ids = _ids()
        data = [{"input_ids": ids[i % 2], "labels": ids[i % 2]} for i in range(8)]
        args = transformers.TrainingArguments(
            output_dir=str(output), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
            save_steps=2, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        )
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
        trainer.train(resume_from_checkpoint=resume)
        return model

    straight = run(tmp_path / "a", 4)
    assert (tmp_path / "a" / "checkpoint-2" / "adapter_model.safetensors").exists()
    resumed = run(tmp_path / "b", 4, resume=str(tmp_path / "a" / "checkpoint-2"))
    ids = _ids(3)
    assert torch.equal(resumed(ids).logits, straight(ids).logits)
    assert any(float(layer.delta.abs().max()) > 0 for layer in fk.frod_layers(straight).values())


def test_readme_quantized_recipe_runs(llama_dir, tmp_path):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Fine-tuning on a quantized base", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    code = code.replace('"path/to/llama"', repr(str(llama_dir))).replace('"out"', repr(str(tmp_path / "out")))
    names: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), names)
    assert isinstance(names["model"].model.layers[0].mlp.down_proj, FRoDInputLinear)
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
    plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(plain.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_lossy_merge_requantizes_reports_and_unmerges_exactly(llama_dir, tmp_path):
    model = _trained(llama_dir, scale=0.3)
    packed = _packed(model)
    ids = _ids()
    want = model(ids).logits.detach()
    base_logits = _load(llama_dir)(ids).logits.detach()
    lost = fk.merge_frod(model, lossy=True)
    assert set(lost) == set(fk.frod_layers(model)) and all(0 < e < 1 for e in lost.values())
    merged = model(ids).logits.detach()
    # Requantized: closer to the trained function than the base is, but not equal to it.
    assert 0 < float((merged - want).abs().max()) < float((base_logits - want).abs().max())
    fk.save_frod(model, tmp_path / "merged.safetensors")  # the adapter names the original base
    assert torch.equal(fk.load_frod(_load(llama_dir), tmp_path / "merged.safetensors")(ids).logits, want)
    fk.unmerge_frod(model)
    assert torch.equal(model(ids).logits, want)
    assert all(torch.equal(p, packed[n]) for n, p in _packed(model).items())


def test_inference_without_grad_keeps_the_base_as_stored(llama_dir):
    """bitsandbytes repacks a 4-bit layer for CPU inference (no_grad, eval, AVX512-BF16), rounding its scales
    to bfloat16 in place: FRoD's layers keep it from doing so, so inference neither changes the function
    nor the bytes the adapter's fingerprint covers."""
    model = _trained(llama_dir)
    ids = _ids()
    want = model(ids).logits.detach()
    packed = _packed(model)
    with torch.no_grad():
        first = model(ids).logits
        second = model(ids).logits
    # Without gradients the transform folds M into V (docs/design.md §5.2): the same function, other rounding.
    assert torch.equal(first, second) and float((first - want).abs().max()) < 1e-5
    assert all(torch.equal(p, packed[n]) for n, p in _packed(model).items())


def test_a_base_repacked_for_cpu_inference_is_refused(llama_dir):
    model = _load(llama_dir)
    layer = model.model.layers[0].self_attn.q_proj
    if not getattr(layer, "support_avx512bf16_for_cpu", False):
        pytest.skip("bitsandbytes repacks 4-bit layers only on CPUs with AVX512-BF16")
    with torch.no_grad():
        layer(torch.randn(2, 64))  # 64 = a multiple of the block size: bitsandbytes repacks it
    with pytest.raises(ValueError, match="repacked this Linear4bit for CPU inference"):
        fk.apply_frod(model, ["q_proj"], mode="input")
    assert not fk.frod_layers(model)


def test_float_exports_in_a_chosen_dtype(llama_dir, tmp_path):
    model = _trained(llama_dir)
    state = fk.merged_state_dict(model, dtype=torch.bfloat16)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    fk.save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    assert saved["model.layers.1.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert not any(".absmax" in k or "base_layer" in k for k in saved)
    merged = model.model.layers[0].self_attn.q_proj.effective_weight()
    fk.unload_frod(model, merge=True, dtype=torch.bfloat16)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, merged.to(torch.bfloat16))
