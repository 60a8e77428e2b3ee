"""Large-batch data-parallel training with the Neumann optimizer, launched with torchrun.

    torchrun --standalone --nproc_per_node 2 examples/train_large_batch.py \
        --engine ddp --global-batch 8192 --micro-batch 1024 --epochs 10

- ``--engine ddp`` (replicated model) or ``fsdp2`` (``fully_shard``: parameters, gradients and
  the optimizer's ``m`` and ``v`` sharded across ranks).
- The global batch is split over ranks and, when it does not fit, over micro-batches whose
  gradients are accumulated locally (no communication until the last one).
- Learning rate: linear scaling, ``lr = base_lr * global_batch / 128``.
- gloo on CPU, nccl on GPUs (picked automatically); the same command works on both.
- ``--ckpt DIR`` saves a ``torch.distributed.checkpoint`` after every epoch; rerunning the same
  command resumes from it.
- Data: MNIST-1D generated offline (``--task mnist1d-80k``, default) or CIFAR-10 from
  ``--data-dir`` (python-pickle format, never downloaded). Needs the reproduction (``pip install ./neumann-repro``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from neumann_repro.tasks import has_batchnorm, load_task, make_model
from torch import nn

from neumann_optimizer import Neumann


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["ddp", "fsdp2"], default="ddp")
    p.add_argument("--task", default="mnist1d-80k")
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    p.add_argument("--global-batch", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=1024, help="per-rank batch of one forward/backward")
    p.add_argument("--base-lr", type=float, default=0.1, help="learning rate at batch 128 (scaled linearly)")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ckpt", type=Path, default=None, help="checkpoint directory (resumes if present)")
    p.add_argument("--cache", type=Path, default=Path("runs/data"))
    return p.parse_args()


def log(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def main() -> None:
    args = parse()
    use_cuda = torch.cuda.is_available()
    # torch._dynamo (imported by DDP's constructor and torch.compile) keeps a process group that
    # exists when it is first imported alive past destroy_process_group(); imported before the
    # group, it holds nothing, and gloo's threads end at destroy_process_group() below, not during
    # interpreter teardown (where they can abort the process)
    importlib.import_module("torch._dynamo")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    train(args, use_cuda)
    # Free every object holding the process group (device mesh, DTensors, checkpoint planners)
    # before destroying it: one left for interpreter exit can abort the process with gloo.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def train(args: argparse.Namespace, use_cuda: bool) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    per_rank = args.global_batch // world
    if args.global_batch % world or per_rank % args.micro_batch:
        raise SystemExit("--global-batch must be divisible by world size x --micro-batch")
    accum = per_rank // args.micro_batch

    if rank == 0:  # generate the data set once, the other ranks read the cache
        load_task(args.task, args.cache, args.data_dir)
    dist.barrier()
    data = load_task(args.task, args.cache, args.data_dir)
    torch.manual_seed(args.seed)
    model = make_model(args.model, data).to(device)
    if args.engine == "ddp":
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(model)
    else:
        from torch.distributed.fsdp import fully_shard

        mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world,))
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                fully_shard(m, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    n = len(data.x_train)
    steps_per_epoch = n // args.global_batch
    lr = args.base_lr * args.global_batch / 128
    opt = Neumann(wrapped.parameters(), lr=lr, steps_per_epoch=steps_per_epoch)
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total) / total)))
    log(
        f"{args.engine} on {world} rank(s) ({'nccl' if use_cuda else 'gloo'}): global batch {args.global_batch} = "
        f"{world} ranks x {accum} micro-batches x {args.micro_batch}; lr {lr:g}; {steps_per_epoch} steps/epoch; "
        f"burn-in {opt.param_groups[0]['burn_in_steps']} steps"
    )

    start_epoch = 0
    if args.ckpt is not None and (args.ckpt / ".metadata").exists():
        start_epoch = load_checkpoint(args.ckpt, wrapped, opt, sched)
        log(f"resumed from {args.ckpt} at epoch {start_epoch}")

    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed * 1000 + epoch)  # same permutation on every rank
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        for k in range(steps_per_epoch):
            idx = perm[k * args.global_batch : (k + 1) * args.global_batch][rank * per_rank : (rank + 1) * per_rank]
            opt.zero_grad(set_to_none=True)
            for j in range(accum):
                mb = idx[j * args.micro_batch : (j + 1) * args.micro_batch]
                last = j == accum - 1
                set_sync(wrapped, args.engine, last)
                no_sync = args.engine == "ddp" and not last
                with wrapped.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                    loss = nn.functional.cross_entropy(wrapped(x_train[mb]), y_train[mb]) / accum
                    loss.backward()
                loss_sum += loss.detach()
            opt.step()
            sched.step()
        dist.all_reduce(loss_sum)
        train_loss = loss_sum.item() / (steps_per_epoch * world)
        err = evaluate(wrapped, opt, data, device, rank, world, x_train)
        log(
            f"epoch {epoch + 1:3d}  train loss {train_loss:.4f}  test error {err:5.2f}%  "
            f"({time.perf_counter() - t0:.1f} s, step {opt.param_groups[0]['step']})"
        )
        if args.ckpt is not None:
            save_checkpoint(args.ckpt, wrapped, opt, sched, epoch + 1)


def set_sync(model: nn.Module, engine: str, sync: bool) -> None:
    if engine == "fsdp2":
        model.set_requires_gradient_sync(sync)  # type: ignore[operator]


@torch.no_grad()
def evaluate(model: nn.Module, opt: Neumann, data, device, rank: int, world: int, x_train) -> float:  # type: ignore[no-untyped-def]
    """Test error (%) at the evaluation weights, BatchNorm statistics recomputed for them."""
    opt.eval()
    saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    if has_batchnorm(model):
        torch.optim.swa_utils.update_bn([x_train[i : i + 1024] for i in range(0, 8192, 1024)], model)
    model.eval()
    xs, ys = data.x_test[rank::world].to(device), data.y_test[rank::world].to(device)
    wrong = torch.zeros((), device=device)
    for i in range(0, len(xs), 4096):
        wrong += (model(xs[i : i + 4096]).argmax(1) != ys[i : i + 4096]).sum()
    dist.all_reduce(wrong)
    model.train()
    if saved:
        model.load_state_dict(saved, strict=False)
    opt.train()
    return 100.0 * wrong.item() / len(data.x_test)


def save_checkpoint(path: Path, model, opt, sched, epoch: int) -> None:  # type: ignore[no-untyped-def]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "extra": {"epoch": epoch, "sched": sched.state_dict()}}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(path), overwrite=True))


def load_checkpoint(path: Path, model, opt, sched) -> int:  # type: ignore[no-untyped-def]
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd, "extra": {"epoch": 0, "sched": sched.state_dict()}}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(state["extra"]["sched"])
    return int(state["extra"]["epoch"])


if __name__ == "__main__":
    main()
