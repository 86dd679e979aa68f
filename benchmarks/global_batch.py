"""What mining over the global batch costs across devices (docs/scaling.md).

One forward + backward of a batch loss on B embeddings of size D, split over R devices:

- jax: the loss compiled over a batch sharded by rows on R forced host devices (as under
  `keras.distribution.DataParallel`) against one device: per-device temporary memory from
  XLA's memory analysis, and the per-device block of the B x B matrix in the compiled program.
- torch: R gloo processes on 127.0.0.1, each with B / R rows; global mining (the all-gather of
  the embeddings and labels, the loss of the global batch, the all-reduce of the gathered
  embeddings' gradient) against local mining, and against one process with the whole batch.

    python benchmarks/global_batch.py --backend jax --batch 1024 --devices 8
    python benchmarks/global_batch.py --backend torch --batch 1024 --devices 2

Each backend runs in a child process (the devices must be set before the backend starts).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

import numpy as np

LOSS = "SupConLoss"


def _inputs(batch, dim):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, dim)).astype("float32")
    y = np.repeat(np.arange(batch // 4), 4).astype("int32")
    rng.shuffle(y)
    return x, y


def _jax(args):
    import jax

    from deepmetric import losses

    loss = getattr(losses, LOSS)()
    x, y = _inputs(args.batch, args.dim)
    step = jax.jit(jax.value_and_grad(lambda e, labels: loss(labels, e)))
    print("| devices | temp memory per device | B x B block per device | ms per step |")
    print("|---|---|---|---|")
    for devices in (1, args.devices):
        mesh = jax.sharding.Mesh(np.array(jax.devices()[:devices]), ("batch",))
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
        e, labels = jax.device_put(x, rows), jax.device_put(y, rows)
        compiled = step.lower(e, labels).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        text = compiled.as_text()
        b = args.batch
        block = f"({b // devices}, {b})" if f"f32[{b // devices},{b}]" in text else "?"
        if f"f32[{b},{b}]" in text:
            block += f" and ({b}, {b})"
        jax.block_until_ready(compiled(e, labels))
        start = time.perf_counter()
        for _ in range(args.repeats):
            jax.block_until_ready(compiled(e, labels))
        ms = (time.perf_counter() - start) / args.repeats * 1e3
        print(f"| {devices} | {temp / 2**20:.1f} MiB | {block} | {ms:.1f} |")


def _torch_process(rank, port, args, queue):
    import torch
    import torch.distributed as dist

    from deepmetric import losses

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.devices
    )
    x, y = _inputs(args.batch, args.dim)
    local = args.batch // args.devices
    xs, ys = (
        torch.tensor(x[rank * local : (rank + 1) * local]),
        torch.tensor(y[rank * local :][:local]),
    )
    times = {}
    for mining in ("global", "local"):
        loss = getattr(losses, LOSS)(mining=mining)

        def step(loss=loss):
            e = xs.clone().requires_grad_(True)
            value = loss(ys, e)
            value.backward()
            return e.grad

        step()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(args.repeats):
            step()
        dist.barrier()
        times[mining] = (time.perf_counter() - start) / args.repeats * 1e3
    if rank == 0:
        queue.put(times)
    dist.destroy_process_group()


def _torch(args):
    import torch
    import torch.multiprocessing as mp

    from deepmetric import losses

    torch.set_num_threads(1)
    x, y = _inputs(args.batch, args.dim)
    loss = getattr(losses, LOSS)()
    e, labels = torch.tensor(x), torch.tensor(y)

    def step():
        v = e.clone().requires_grad_(True)
        loss(labels, v).backward()

    step()
    start = time.perf_counter()
    for _ in range(args.repeats):
        step()
    single = (time.perf_counter() - start) / args.repeats * 1e3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_torch_process, args=(port, args, queue), nprocs=args.devices, join=True)
    times = queue.get()
    sent = args.batch * (args.dim * 4 + 4 + 4) / 2**10
    print("| setup | ms per step (one thread per process) |")
    print("|---|---|")
    print(f"| 1 process, B = {args.batch} | {single:.1f} |")
    print(f"| {args.devices} processes, global mining | {times['global']:.1f} |")
    print(f"| {args.devices} processes, local mining | {times['local']:.1f} |")
    print(
        f"\nGathered per step: {sent:.0f} KiB (B x (D floats + label + size)), "
        f"and the (B, D) gradient all-reduced in the backward pass."
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "torch"), default="jax")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        env = dict(os.environ, KERAS_BACKEND=args.backend)
        if args.backend == "jax":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
        sys.exit(subprocess.call([sys.executable, *sys.argv, "--child"], env=env))
    print(f"{LOSS}, B = {args.batch}, D = {args.dim}, {args.backend}, {args.devices} devices\n")
    {"jax": _jax, "torch": _torch}[args.backend](args)


if __name__ == "__main__":
    main()
