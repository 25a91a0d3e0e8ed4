"""The workflows users run around the API: the HF Trainer (save, checkpoints, resume, reload), dtype
casts before saving and loading, meta-device loading, inference mode, shared-cluster file modes."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
import textwrap
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import frod_kernels as fk
from benchmarks.cross_dtype_load import as_format_3
from frod_kernels.targets import frod_categories, frod_layers

from _problems import randomise_frod, tiny_bert

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it
transformers.logging.set_verbosity_error()

TARGETS = ["q_proj", "v_proj"]
IDS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))


def _llama(seed: int = 0, dtype: torch.dtype = torch.float32, hidden: int = 48) -> nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=72,
        vocab_size=100, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


class _Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 100, (32, 12), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(model: nn.Module, out, steps: int) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=2, seed=0,
        report_to=[], use_cpu=True, logging_steps=1000, disable_tqdm=True, dataloader_num_workers=0,
    )
    return transformers.Trainer(model=model, args=args, train_dataset=_Tokens())


def _frod_llama(path: str = "auto") -> nn.Module:
    model = _llama()
    fk.apply_frod(model, fk.FRoDConfig(TARGETS, path=path))
    return model


def _max_param_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True))


# -- the HF Trainer --------------------------------------------------------------------------------


def test_trainer_saves_reload_exactly_every_way(tmp_path):
    """save_model and every checkpoint-*: load_frod into a fresh base gives exactly the trained function,
    from_pretrained gives it merged, and a refused base still is refused."""
    model = _frod_llama()
    trainer = _trainer(model, tmp_path / "run", steps=4)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    trained = _logits(model)
    assert not torch.equal(trained, _logits(_llama()))  # training changed the function
    checkpoints = sorted((tmp_path / "run").glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-2", "checkpoint-4"]
    for directory in [tmp_path / "final", *checkpoints]:
        reloaded = fk.load_frod(_llama(), directory)
        if directory.name != "checkpoint-2":
            assert torch.equal(_logits(reloaded), trained)
        plain = transformers.LlamaForCausalLM.from_pretrained(directory).eval()
        assert not fk.frod_layers(plain)
        torch.testing.assert_close(_logits(plain), _logits(reloaded), rtol=1e-5, atol=1e-5)
    other = _llama(seed=1)
    with pytest.raises(ValueError, match="differ from those the adapter was trained on"):
        fk.load_frod(other, tmp_path / "final")
    assert not fk.frod_layers(other)


@pytest.mark.parametrize("path", ["token", "weight", "basis", "auto"])
def test_trainer_resume_is_bit_exact(tmp_path, path):
    """6 straight steps vs a fresh model resumed from that run's checkpoint-4, with the Trainer's default
    (fused) AdamW: the same parameters bit for bit."""
    straight = _frod_llama(path)
    _trainer(straight, tmp_path / "a", steps=6).train()
    resumed = _frod_llama(path)
    _trainer(resumed, tmp_path / "b", steps=6).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert _max_param_difference(straight, resumed) == 0.0
    assert _max_param_difference(straight, _frod_llama(path)) > 0.0  # training changed δ and s


def test_fused_optimizer_steps_invalidate_the_cached_weight():
    """Fused optimizers do not bump version counters: evaluation after a step must not use the old W'."""
    layer = fk.FRoDLinear.from_linear(nn.Linear(24, 16), sparse_rate=0.2)
    x = torch.randn(5, 24)
    with torch.no_grad():
        before = layer(x)
    assert layer.last_path == "cached W'"
    opt = torch.optim.AdamW([layer.delta, layer.sparse_values], lr=0.1, fused=True)
    layer(x).pow(2).sum().backward()
    version = layer.delta._version
    opt.step()
    assert layer.delta._version == version  # the reason: the step is invisible to version counters
    with torch.no_grad():
        after = layer(x)
        expected = nn.functional.linear(x, layer.effective_weight(), layer.bias)
    assert not torch.equal(after, before)
    assert torch.equal(after, expected)


# -- dtype casts ------------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("applied", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cast", DTYPES)
def test_cast_matrix(tmp_path, applied, cast):
    """apply in `applied`, cast to `cast`, train 3 steps, save; load into the same base in each dtype:
    accepted, within that dtype's rounding of the trained model; a base changed in one entry: refused in
    every dtype. One pair cannot be checked: a base applied in bfloat16 is recorded only in bfloat16, and
    float16 weights cannot be rounded to the same bfloat16 values (both are roundings of the float32
    checkpoint): refused, naming both dtypes."""
    model = _llama(dtype=applied)
    fk.apply_frod(model, fk.FRoDConfig(TARGETS))
    model.to(cast)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)  # Adam is NaN in pure fp16
    model.train()
    for _ in range(3):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    fk.save_frod(model, tmp_path / "adapter")
    trained = _logits(copy.deepcopy(model).float())
    assert _rel(trained, _logits(copy.deepcopy(_llama(dtype=applied)).to(cast).float())) > 3e-4  # it trained
    for load in DTYPES:
        if applied == torch.bfloat16 and load == torch.float16:
            with pytest.raises(ValueError, match="float16.*bfloat16"):
                fk.load_frod(_llama(dtype=load), tmp_path / "adapter")
            continue
        loaded = fk.load_frod(_llama(dtype=load), tmp_path / "adapter")
        assert {layer.delta.dtype for layer in fk.frod_layers(loaded).values()} == {cast}  # as saved
        # The yardstick: the base model's own rounding in the coarsest dtype involved, or the trained
        # model's when simply cast to the loading dtype, whichever is larger.
        worst = max({applied, cast, load}, key=lambda d: torch.finfo(d).eps)
        rounding = max(_rel(_logits(_llama(dtype=worst)), _logits(_llama())),
                       _rel(_logits(copy.deepcopy(model).to(load)), trained))
        assert _rel(_logits(loaded), trained) <= 3 * rounding + 1e-6, (load, worst)
        changed = _llama(dtype=load)
        with torch.no_grad():
            changed.model.layers[1].self_attn.v_proj.weight[3, 7] += 0.25
        with pytest.raises(ValueError, match="differ"):
            fk.load_frod(changed, tmp_path / "adapter")
        assert not fk.frod_layers(changed)


def test_cast_back_and_forth_saves_and_reloads(tmp_path):
    """fp32 → bf16 → fp32 keeps provenance: the save is accepted (it was refused as "base weights changed"),
    δ and s come back exactly, the output within bfloat16's rounding (the model's W is rounded now)."""
    model = _llama()
    fk.apply_frod(model, fk.FRoDConfig(TARGETS))
    randomise_frod(model, 1e-2)
    model.to(torch.bfloat16).to(torch.float32)
    fk.save_frod(model, tmp_path / "adapter")
    loaded = fk.load_frod(_llama(), tmp_path / "adapter")
    for name, layer in fk.frod_layers(model).items():
        assert torch.equal(fk.frod_layers(loaded)[name].delta, layer.delta)
    rounding = _rel(_logits(_llama(dtype=torch.bfloat16)), _logits(_llama()))
    assert _rel(_logits(loaded), _logits(model)) <= 3 * rounding


def test_other_values_loaded_after_apply_still_refuse_to_save(tmp_path):
    model = _llama()
    fk.apply_frod(model, fk.FRoDConfig(TARGETS))
    model.load_state_dict(_llama(seed=1).state_dict(), strict=False)
    with pytest.raises(ValueError, match="changed after FRoD was applied"):
        fk.save_frod(model, tmp_path / "adapter")
    model.load_state_dict(_llama().state_dict(), strict=False)  # the original values again
    fk.save_frod(model, tmp_path / "adapter")


def test_a_dtype_refusal_names_both_dtypes(tmp_path):
    model = _llama(dtype=torch.bfloat16)
    fk.apply_frod(model, fk.FRoDConfig(TARGETS))
    fk.save_frod(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match="float16.*bfloat16"):
        fk.load_frod(_llama(dtype=torch.float16), tmp_path / "adapter")


def test_param_dtype_on_load(tmp_path):
    model = _llama(dtype=torch.bfloat16)
    fk.apply_frod(model, fk.FRoDConfig(TARGETS, param_dtype=torch.float32))
    randomise_frod(model, 1e-3)
    fk.save_frod(model, tmp_path / "adapter")
    kept = fk.load_frod(_llama(dtype=torch.bfloat16), tmp_path / "adapter")
    assert {layer.delta.dtype for layer in fk.frod_layers(kept).values()} == {torch.float32}
    assert torch.equal(_logits(kept), _logits(model))
    rounded = fk.load_frod(_llama(dtype=torch.bfloat16), tmp_path / "adapter", param_dtype=torch.bfloat16)
    assert {layer.delta.dtype for layer in fk.frod_layers(rounded).values()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="param_dtype"):
        fk.load_frod(kept, tmp_path / "adapter", param_dtype=torch.bfloat16)


# -- meta device -------------------------------------------------------------------------------------

_META_FLOW = textwrap.dedent("""
    import torch, transformers, frod_kernels as fk
    transformers.logging.set_verbosity_error()
    def llama():
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=72, vocab_size=100, max_position_embeddings=32)
        return transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(5))
    model = llama()
    fk.apply_frod(model, fk.FRoDConfig(["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in fk.frod_layers(model).values():
            layer.delta.normal_(0, 1e-2); layer.sparse_values.normal_(0, 1e-2)
    fk.save_frod(model, "{adapter}")
    expected = model(ids).logits
    model.to("meta")
    model.to_empty(device="cpu")
    try:
        model(ids)
        raise SystemExit("ran on an uninitialised basis")
    except RuntimeError as exc:
        assert "to_empty" in str(exc), exc
    try:
        fk.load_frod(model, "{adapter}")
        raise SystemExit("loaded onto uninitialised base weights")
    except ValueError as exc:
        assert "load the base weights" in str(exc), exc
    model.load_state_dict(llama().state_dict(), strict=False)
    # Non-persistent buffers are in no checkpoint: rebuilt as from_pretrained does after a meta init.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    fk.load_frod(model, "{adapter}")
    assert torch.equal(model(ids).logits, expected)
    print("META FLOW OK")
""")


def test_meta_to_empty_then_load_frod_equals_the_ordinary_flow(tmp_path):
    """Run in a subprocess: a crash (the old segfault) is a failure here, not a dead test run."""
    script = _META_FLOW.replace("{adapter}", str(tmp_path / "adapter"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "META FLOW OK" in done.stdout


def test_apply_frod_on_meta_weights_is_refused():
    with torch.device("meta"):
        model = _llama()
    with pytest.raises(ValueError, match="meta device"):
        fk.apply_frod(model, fk.FRoDConfig(TARGETS))
    assert not fk.frod_layers(model)


# -- inference mode, file modes, activation checkpointing ---------------------------------------------


def test_inference_mode_does_not_poison_the_cached_weight():
    """Eval under inference_mode, then a step where FRoD is frozen but its input needs a gradient."""
    torch.manual_seed(0)
    embed = nn.Linear(8, 24)
    layer = fk.FRoDLinear.from_linear(nn.Linear(24, 16), sparse_rate=0.2)
    randomise_frod(layer, 0.1)
    layer.delta.requires_grad_(False)
    layer.sparse_values.requires_grad_(False)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        layer(embed(x))
    layer(embed(x)).pow(2).sum().backward()
    assert layer.last_path == "cached W'"
    grad = embed.weight.grad.clone()
    embed.weight.grad = None
    layer.cache_weight = False
    layer(embed(x)).pow(2).sum().backward()
    torch.testing.assert_close(embed.weight.grad, grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_adapter_files_get_the_umask_permissions(tmp_path, umask):
    model = _frod_llama()
    old = os.umask(umask)
    try:
        fk.save_frod(model, tmp_path / "adapter")
        fk.save_frod(model, tmp_path / "one.safetensors")
    finally:
        os.umask(old)
    for path in [tmp_path / "adapter" / "adapter_model.safetensors", tmp_path / "adapter" / "adapter_config.json",
                 tmp_path / "one.safetensors"]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("method", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_both_checkpointing_names_train(method):
    model = _frod_llama()
    if not hasattr(model, method):
        pytest.skip(f"transformers {transformers.__version__} has no {method}")
    model.train()
    deprecated = method == "gradient_checkpointing_enable" and hasattr(model, "activation_checkpointing_enable")
    with pytest.warns(FutureWarning) if deprecated else contextlib.nullcontext():
        getattr(model, method)()
    model(IDS, labels=IDS).loss.backward()
    grads = [layer.delta.grad for layer in fk.frod_layers(model).values()]
    assert all(g is not None and bool(g.abs().sum() > 0) for g in grads)


# -- refusals named in the error catalogue ----------------------------------------------------------


def test_refused_resume_leaves_the_layers_as_they_were(tmp_path):
    model = _frod_llama()
    randomise_frod(model, 1e-2)
    model.save_pretrained(tmp_path / "ckpt")
    other = _llama(seed=1)
    fk.apply_frod(other, fk.FRoDConfig(TARGETS))
    before = {name: (layer.weight.clone(), layer.delta.clone()) for name, layer in fk.frod_layers(other).items()}
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    with pytest.raises(RuntimeError, match="written from another base model"):
        other.load_state_dict(state, strict=False)
    for name, layer in fk.frod_layers(other).items():
        assert torch.equal(layer.weight, before[name][0]) and torch.equal(layer.delta, before[name][1])
    del state["model.layers.0.self_attn.q_proj.delta"]
    state["model.layers.1.self_attn.q_proj.weight"] = state["model.layers.1.self_attn.q_proj.weight"][:, :5]
    with pytest.raises(RuntimeError, match="needs weight, delta and sparse_values") as info:
        _frod_llama().load_state_dict(state, strict=False)
    assert "merged weight has shape (48, 5)" in str(info.value)


def test_resaved_adapter_keeps_every_dtype_of_its_base(tmp_path):
    model = _frod_llama()
    randomise_frod(model, 1e-2)
    fk.save_frod(model, tmp_path / "first")
    in_bf16 = fk.load_frod(_llama(dtype=torch.bfloat16), tmp_path / "first")
    fk.save_frod(in_bf16, tmp_path / "again")
    for dtype in DTYPES:
        fk.load_frod(_llama(dtype=dtype), tmp_path / "again")  # fp16 too: the record came along


def test_format_2_adapters_still_load(tmp_path):
    """Format 2 recorded one fingerprint, of the weights in the dtype they were saved in."""
    import json

    from safetensors.torch import load_file, safe_open, save_file

    model = _frod_llama()
    randomise_frod(model, 1e-2)
    fk.save_frod(model, tmp_path / "v3.safetensors")
    with safe_open(str(tmp_path / "v3.safetensors"), framework="pt") as f:
        meta = f.metadata()
    cats = json.loads(meta["categories"])
    for cat in cats.values():
        cat["fingerprint"] = cat.pop("fingerprints")["float32"]
    meta.update(version="2", categories=json.dumps(cats))
    save_file(load_file(str(tmp_path / "v3.safetensors")), str(tmp_path / "v2.safetensors"), metadata=meta)
    assert torch.equal(_logits(fk.load_frod(_llama(), tmp_path / "v2.safetensors")), _logits(model))
    with pytest.raises(ValueError, match="format 2"):
        fk.load_frod(_llama(dtype=torch.bfloat16), tmp_path / "v2.safetensors")


# -- a rebuilt basis is aligned to the adapter's record of V (format 4) -----------------------------


def _other_machine(monkeypatch, flip=(), mix=()):
    """Make eigh come out as another machine's may: the eigenvector columns in ``flip`` with the opposite
    sign, and each pair (i, j) in ``mix`` rotated into each other by 0.3 rad (an equally exact basis)."""
    real = torch.linalg.eigh

    def eigh(t):
        values, vectors = real(t)
        vectors = vectors.clone()
        vectors[:, list(flip)] *= -1
        c, s = torch.cos(torch.tensor(0.3, dtype=vectors.dtype)), torch.sin(torch.tensor(0.3, dtype=vectors.dtype))
        for i, j in mix:
            vectors[:, [i, j]] = vectors[:, [i, j]] @ torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
        return SimpleNamespace(eigenvalues=values, eigenvectors=vectors)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)


@pytest.mark.parametrize("mode,hidden", [("additive", 48), ("input", 48), ("additive", 96)])
def test_a_rebuilt_basis_is_aligned_to_the_adapters(tmp_path, monkeypatch, mode, hidden):
    """eigh's sign and the rotation of nearly equal eigenvalues' eigenvectors are not functions of the weights:
    a load aligns the rebuilt V to the adapter's record. Signs alone: bit for bit; a rotation: to rounding.
    n = 48: every row recorded, one block; n = 96: blocks of 32 columns, the pair (31, 32) straddling one."""
    model = _llama(hidden=hidden)
    fk.apply_frod(model, fk.FRoDConfig(TARGETS, mode=mode))
    randomise_frod(model, 1e-1)
    fk.save_frod(model, tmp_path / "a.safetensors")
    as_format_3(tmp_path / "a.safetensors", tmp_path / "v3.safetensors")
    want = _logits(model)
    with monkeypatch.context() as patch:
        _other_machine(patch, flip=[0, 5, 47])
        assert torch.equal(_logits(fk.load_frod(_llama(hidden=hidden), tmp_path / "a.safetensors")), want)
        # Without the record (format 3) the same basis computes another function: the record matters.
        assert _rel(_logits(fk.load_frod(_llama(hidden=hidden), tmp_path / "v3.safetensors")), want) > 1e-3
    with monkeypatch.context() as patch:
        _other_machine(patch, flip=[3], mix=[(10, 12), (20, 21), (31, 32)])
        assert _rel(_logits(fk.load_frod(_llama(hidden=hidden), tmp_path / "a.safetensors")), want) < 1e-5
        assert _rel(_logits(fk.load_frod(_llama(hidden=hidden), tmp_path / "v3.safetensors")), want) > 1e-3


def test_a_basis_that_cannot_be_aligned_is_refused_and_the_model_left_alone(tmp_path, monkeypatch):
    model = _llama(hidden=96)  # n = 96 > the 64 rows recorded: the alignment works on blocks of 32 columns
    fk.apply_frod(model, fk.FRoDConfig(TARGETS))
    randomise_frod(model, 1e-1)
    fk.save_frod(model, tmp_path / "a.safetensors")
    _other_machine(monkeypatch, mix=[(0, 40)])  # never in one block of the alignment
    base = _llama(hidden=96)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="differs from the one the adapter was trained in"):
        fk.load_frod(base, tmp_path / "a.safetensors")
    assert not fk.frod_layers(base) and all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    with pytest.warns(fk.FRoDBaseMismatchWarning, match="at the recorded rows"):
        fk.load_frod(base, tmp_path / "a.safetensors", allow_other_base=True)


def test_a_model_with_its_own_layers_is_realigned_and_a_refusal_undoes_it(tmp_path, monkeypatch):
    """Into a model that has FRoD layers of its own, built where eigh flips a column: the load decomposes
    again aligned to the record; a NaN in δ is then refused and V, U and λ are back as they were."""
    model = _frod_llama()
    randomise_frod(model, 1e-1)
    fk.save_frod(model, tmp_path / "a.safetensors")
    with monkeypatch.context() as patch:
        _other_machine(patch, flip=[2], mix=[(30, 31)])
        mine = _frod_llama()
    basis, names = next(iter(frod_categories(mine).values()))
    layer = frod_layers(mine)[names[0]]
    V, U, lam = basis.V.clone(), layer.U.clone(), layer.lam.clone()
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(tmp_path / "a.safetensors"))
    tensors[f"{names[0]}.delta"][0] = float("nan")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=f.metadata())
    with pytest.raises(ValueError, match="NaN"):
        fk.load_frod(mine, tmp_path / "bad.safetensors")
    assert torch.equal(basis.V, V) and torch.equal(layer.U, U) and torch.equal(layer.lam, lam)
    fk.load_frod(mine, tmp_path / "a.safetensors")
    assert _rel(_logits(mine), _logits(model)) < 1e-5


def test_a_merged_checkpoint_into_a_basis_that_came_out_otherwise(tmp_path, monkeypatch):
    """A Trainer checkpoint resumed where eigh flips a column: load_state_dict refuses, naming the cause and
    the way out; load_frod of the same directory aligns the basis to the adapter saved beside it."""
    model = _frod_llama()
    randomise_frod(model, 1e-1)
    model.save_pretrained(tmp_path / "ckpt")
    with monkeypatch.context() as patch:
        _other_machine(patch, flip=[2])
        mine = _frod_llama()
    from safetensors.torch import load_file

    with pytest.raises(RuntimeError, match="came out otherwise here"):
        mine.load_state_dict(load_file(str(tmp_path / "ckpt" / "model.safetensors")), strict=False)
    with monkeypatch.context() as patch:
        _other_machine(patch, flip=[2])
        assert torch.equal(_logits(fk.load_frod(_llama(), tmp_path / "ckpt")), _logits(model))


def test_a_damaged_record_is_refused(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    fk.save_frod(_frod_llama(), tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as f:
        meta = f.metadata()
    good = load_file(str(tmp_path / "a.safetensors"))
    key = next(k for k in good if k.startswith("frod_basis_record:"))
    for damage in (good[key][:3], good[key].int(), good[key] * float("inf"), None):
        tensors = {k: v for k, v in good.items() if k != key}
        if damage is not None:
            tensors[key] = damage
        save_file(tensors, str(tmp_path / "d.safetensors"), metadata=meta)
        with pytest.raises(ValueError, match="record of V"):
            fk.load_frod(_llama(), tmp_path / "d.safetensors")


def test_apply_frod_options_come_from_one_place():
    with pytest.raises(TypeError, match="FRoDConfig and the keywords"):
        fk.apply_frod(_llama(), fk.FRoDConfig(TARGETS), sparse_rate=0.1)
    with pytest.raises(TypeError, match="unknown options"):
        fk.apply_frod(_llama(), TARGETS, sparse_rte=0.1)
    with pytest.warns(fk.FRoDCategoryWarning, match="'bert.pooler.dense' has one layer"):
        fk.apply_frod(tiny_bert(), ["dense"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", fk.FRoDCategoryWarning)
        fk.apply_frod(_llama(), ["lm_head"])  # named in full: a choice
        fk.apply_frod(_llama(), ["layers.0.mlp.down_proj"])  # with its layer index: a choice
        fk.apply_frod(_llama(), r"model\.layers\.1\.mlp\.up_proj")  # a regex: a choice


def test_everything_that_needs_the_basis_refuses_after_to_empty(tmp_path):
    model = _frod_llama()
    model.to("meta").to_empty(device="cpu")
    layer = next(iter(fk.frod_layers(model).values()))
    for call in (layer.merge, layer.effective_weight, lambda: layer(torch.randn(2, 48))):
        with pytest.raises(RuntimeError, match="to_empty"):
            call()
    with pytest.raises(ValueError, match="holds no values"):
        fk.save_frod(model, tmp_path / "adapter")
    factored = _llama()
    fk.apply_frod(factored, fk.FRoDConfig(TARGETS, mode="factored"))
    fk.save_frod(factored, tmp_path / "factored")
    factored.to("meta").to_empty(device="cpu")
    with pytest.raises(ValueError, match="factored mode keeps no W"):
        fk.load_frod(factored, tmp_path / "factored")


def test_export_save_pretrained_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fk.save_pretrained(nn.Sequential(fk.FRoDLinear.from_linear(nn.Linear(8, 8))), tmp_path / "x")
    with pytest.raises(TypeError, match="do not pass state_dict"):
        fk.save_pretrained(_frod_llama(), tmp_path / "x", state_dict={})
