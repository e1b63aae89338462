"""Data-parallel training with synchronized fused BatchNorm, launched by torchrun.

    torchrun --nproc_per_node=2 examples/ddp_train.py                 # CPU processes, gloo
    torchrun --nproc_per_node=8 examples/ddp_train.py --steps 50      # one GPU per process, NCCL

A small residual network built from the fused modules (fused_resnet.nn.BatchNormReLU2d,
BatchNormAddReLU2d) is converted with fused_resnet.nn.convert_sync_batchnorm, so every
BatchNorm normalizes with the statistics of the global batch, and trained with DDP on synthetic
data (each rank draws its own shard of random images, labelled by a fixed linear function of
their mean colour, so the loss goes down). Rank 0 prints the loss and the time per step, and at the
end checks that the running statistics are the same on every rank (they are computed from the
same global statistics). --no-sync trains the unconverted model (per-rank statistics), to compare
the step time.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist
from torch import nn

import fused_resnet


class BasicBlock(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = fused_resnet.nn.BatchNormReLU2d(channels)  # relu(bn(x))
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = fused_resnet.nn.BatchNormAddReLU2d(channels)  # relu(bn(x) + identity)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))), x)


class SmallResNet(nn.Module):
    def __init__(self, channels=32, blocks=2, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = fused_resnet.nn.BatchNormReLU2d(channels)
        self.blocks = nn.Sequential(*[BasicBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = self.blocks(self.bn(self.stem(x)))
        return self.head(x.mean((2, 3)))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--no-sync", action="store_true", help="keep per-rank BatchNorm statistics")
    return parser.parse_args()


def train(args, use_cuda):
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # the processes share the machine's cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts them)
    model = SmallResNet(args.channels).to(device, memory_format=memory_format)
    if not args.no_sync:
        model = fused_resnet.nn.convert_sync_batchnorm(model)
    # torch's DDP refuses SyncBatchNorm layers in CPU modules; this subclass accepts the fused ones
    ddp = fused_resnet.nn.DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)

    generator = torch.Generator(device=device).manual_seed(1000 + rank)  # this rank's data shard
    labeling = torch.randn(3, 10, device=device, generator=torch.Generator(device=device).manual_seed(0))
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    if rank == 0:
        print(
            f"{world} processes on {device.type} ({dist.get_backend()}), fused backend "
            f"{fused_resnet.backend.resolve(device).name!r}, "
            f"{'per-rank' if args.no_sync else 'synchronized'} BatchNorm, global batch {world * args.batch_size}"
        )
    times = []
    for step in range(args.steps):
        x = torch.randn(shape, device=device, generator=generator).contiguous(memory_format=memory_format)
        target = (x.mean((2, 3)) @ labeling).argmax(1)  # a learnable labelling of the images
        if use_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = nn.functional.cross_entropy(ddp(x), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if use_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # sum over ranks (gloo has no average)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}  {1e3 * times[-1]:.1f} ms")

    # The running statistics come from the global batch: identical on every rank.
    stats = torch.cat([b.detach().flatten().double() for n, b in model.named_buffers() if "running" in n])
    spread = stats.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    dist.all_reduce(stats, op=dist.ReduceOp.MIN)
    if rank == 0:
        steady = sorted(times[len(times) // 2 :])
        print(f"median step time (second half): {1e3 * steady[len(steady) // 2]:.1f} ms")
        print(f"largest difference of running statistics between ranks: {(spread - stats).max().item():.3g}")


def main():
    args = parse_args()
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    train(args, use_cuda)  # returns with the model and DDP released
    dist.barrier()  # every rank is done communicating before the group goes away
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
