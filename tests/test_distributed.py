"""Distributed training with FRoD on torch.distributed (docs/hardening.md §Distributed).

One spawn of 2 CPU processes (gloo, a free local port) runs DDP and FSDP2 (``fully_shard``) in
both modes over a small FRoD model: two steps of AdamW on each rank's half of a batch. The
gradients of step 1 and the parameters after step 2 must equal a single-process run on the whole
batch (loss = mean over the batch, so DDP's gradient average is the full-batch gradient). The
shared V must not be duplicated in state dicts nor broadcast once per layer.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import frod_kernels as fk
from frod_kernels.layer import REUSED_WEIGHT

from _problems import randomise_frod

WORLD = 2
# ddp_nosync: DDP(forward_sync_buffers=False), the recommended setting (no per-forward buffer sync).
# ddp_accum: the same with the weight path forced and gradient accumulation over 2 micro-batches per
# step (the first under no_sync): the second micro-batch reuses W' (docs/design.md §5.4).
RUNS = [("ddp", "additive"), ("ddp", "factored"), ("ddp_nosync", "additive"), ("ddp_accum", "additive"),
        ("fsdp", "additive"), ("fsdp", "factored")]
TIMEOUT_S = 120


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class _Net(nn.Module):
    """Two residual MLP blocks (categories blocks.*.up and blocks.*.down) and a trainable head."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_Block(), _Block())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


def _model(mode: str) -> _Net:
    torch.manual_seed(0)
    net = _Net().double()
    fk.apply_frod(net, ["up", "down"], sparse_rate=0.2, seed=3, mode=mode)
    net.head.requires_grad_(True)
    randomise_frod(net, 0.1)
    return net


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 5, 8, generator=g, dtype=torch.float64)
    return x, torch.randn(8, 5, 3, generator=g, dtype=torch.float64)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor (FSDP2 shards) or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _train(model: nn.Module, x: torch.Tensor, target: torch.Tensor, micro_batches: int = 1) -> tuple[dict, dict]:
    """Two AdamW steps; returns (gradients of step 1, parameters after step 2) by name.

    With ``micro_batches`` > 1 each step accumulates the gradients of that many equal slices of
    the batch (mean losses / micro_batches: the whole batch's gradient), syncing DDP on the last.
    """
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = {}
    for step in range(2):
        opt.zero_grad()
        for i, (xs, ts) in enumerate(zip(x.chunk(micro_batches), target.chunk(micro_batches), strict=True)):
            last = i == micro_batches - 1
            with model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext():
                (nn.functional.mse_loss(model(xs), ts) / micro_batches).backward()
        if step == 0:
            grads = {n: _full(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
    return grads, {n: _full(p.detach()).clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp(model: nn.Module, forward_sync_buffers: bool) -> tuple[nn.Module, dict]:
    """Wrap in DDP and record which buffer storages the forwards broadcast."""
    ddp = nn.parallel.DistributedDataParallel(model, forward_sync_buffers=forward_sync_buffers)
    sent: list[int] = []
    original = ddp._distributed_broadcast_coalesced

    def record(tensors, *args, **kwargs):
        sent.extend(t.untyped_storage().data_ptr() for t in tensors)
        return original(tensors, *args, **kwargs)

    ddp._distributed_broadcast_coalesced = record
    bases = {id(layer.basis): layer.basis for layer in fk.frod_layers(model).values()}.values()
    info = {"V_ptrs": [b.V.untyped_storage().data_ptr() for b in bases], "sent": sent}
    return ddp, info


def _fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x, target = _batch()
        shard = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for engine, mode in RUNS:
            model = _model(mode)
            layers = fk.frod_layers(model).values()
            if engine == "ddp_accum":
                for layer in layers:
                    layer.path = "weight"
            info = {}
            if engine.startswith("ddp"):
                model, info = _ddp(model, forward_sync_buffers=engine == "ddp")
            else:
                model = _fsdp(model)
            grads, params = _train(model, x[shard], target[shard], micro_batches=2 if engine == "ddp_accum" else 1)
            info["last_paths"] = sorted({layer.last_path for layer in layers})
            info["state_dict_keys"] = list(model.state_dict())
            if engine.startswith("ddp"):
                forwards = 4 if engine == "ddp_accum" else 2
                info["V_per_forward"] = [sum(p == v for p in info["sent"]) / forwards for v in info["V_ptrs"]]
                info["buffers_per_forward"] = len(info.pop("sent")) / forwards
            results[(engine, mode)] = {"grads": grads, "params": params, "info": info}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"distributed workers did not finish in {TIMEOUT_S}s")
    finally:
        for p in ctx.processes:  # only ours; normally already gone
            if p.is_alive():
                p.kill()
                p.join()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("engine,mode", RUNS)
def test_matches_single_process(distributed_results, engine, mode):
    expected_grads, expected_params = _train(_model(mode), *_batch())
    assert len(expected_grads) == 2 * 4 + 2
    for rank, results in enumerate(distributed_results):
        got = results[(engine, mode)]
        for name, g in expected_grads.items():
            key = f"module.{name}" if engine.startswith("ddp") else name
            assert g.abs().sum() > 0
            torch.testing.assert_close(got["grads"][key], g, rtol=1e-10, atol=1e-12, msg=f"rank {rank} grad {name}")
        for name, p in expected_params.items():
            key = f"module.{name}" if engine.startswith("ddp") else name
            torch.testing.assert_close(got["params"][key], p, rtol=1e-10, atol=1e-12, msg=f"rank {rank} {name}")


@pytest.mark.parametrize("engine,mode", RUNS)
def test_shared_basis_is_not_duplicated(distributed_results, engine, mode):
    info = distributed_results[0][(engine, mode)]["info"]
    derived = ("U", "lam", "V", "indices", "csr_ptr", "csc_ptr", "csc_perm")
    assert not [k for k in info["state_dict_keys"] if k.rsplit(".", 1)[-1] in derived]
    if engine == "ddp":
        assert info["V_per_forward"] == [1, 1]  # each category's V once per forward, not once per layer
        # DDP's default forward buffer sync also sends each layer's U and λ and each category's
        # pattern: 4 x 2 + 2 x 5 buffers (docs/hardening.md: pass forward_sync_buffers=False).
        assert info["buffers_per_forward"] == 18
    if engine in ("ddp_nosync", "ddp_accum"):
        assert info["buffers_per_forward"] == 0
    if engine == "ddp_accum":  # each step's second micro-batch reused the W' of its first
        assert info["last_paths"] == [REUSED_WEIGHT]


def test_checkpoint_holds_no_derived_tensors(tmp_path):
    model = _model("additive")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    state = torch.load(path)
    assert sorted({k.rsplit(".", 1)[-1] for k in state}) == ["bias", "delta", "sparse_values", "weight"]
    layers = fk.frod_layers(model)
    assert len({id(layer.basis) for layer in layers.values()}) == 2 and len(layers) == 4
    n_buffers = len(list(model.buffers()))
    assert n_buffers == 4 * 2 + 2 * 5  # U, λ per layer; V and the 4 pattern tensors per category


@pytest.mark.skipif(os.name != "posix", reason="spawn test relies on POSIX sockets")
def test_worker_processes_are_gone(distributed_results):
    assert len(distributed_results) == WORLD
    assert not mp.active_children()
