"""Where a process runs: the device (cuda > mps > cpu) and, under torchrun, its place in the
process group. Imports nothing of the project.

Under plain `python train.py` there is no process group at all and rank 0 of 1 does
everything; under `torchrun` (RANK and WORLD_SIZE in the environment) each process joins
the group -- NCCL on CUDA, gloo on CPU -- and rank 0 alone prints, saves and evaluates.
"""
import contextlib
import os
import socket
import sys
import tempfile
import time
from datetime import timedelta

import torch

# Processes started by hand (RANK, WORLD_SIZE, MASTER_* set, no torchrun agent) wait this long for
# their peers to join, then stop in one line: a missing peer never means waiting forever. Under
# torchrun the agent watches its workers, and torch's own timeouts apply.
JOIN_TIMEOUT = timedelta(seconds=30)


class DeviceError(Exception):
    """A device or process group that cannot be had; the message says which and why."""


def pick_device(name):
    """'auto' -> cuda > mps > cpu; an explicit device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return pick_device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"--device {name}: expected auto, cpu, cuda or mps")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps: MPS is not available on this machine")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True    # TF32 tensor cores for fp32 matmuls/convs
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def launched_by_torchrun():
    """True when a launcher set RANK and WORLD_SIZE: this process belongs to a process group."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def answers(addr, port, seconds):
    """True as soon as addr:port accepts a TCP connection (rank 0's store is up), False after
    `seconds` of trying."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            wait = max(0.1, min(2.0, deadline - time.monotonic()))
            socket.create_connection((addr, port), timeout=wait).close()
            return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.2)


@contextlib.contextmanager
def held_back_stderr():
    """c10d logs every failed attempt to reach a peer, with a C++ stack trace, straight to file
    descriptor 2. Hold that output back while joining: written out as it was if the join succeeds,
    replaced by the one-line DeviceError if it fails."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        try:
            saved = os.dup(2)
        except OSError:                        # no stderr to hold back
            yield
            return
        os.dup2(held.fileno(), 2)
        joined = False
        try:
            yield
            joined = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if joined:
                held.seek(0)
                with open(2, "wb", closefd=False) as err:
                    err.write(held.read())


class Dist:
    """Where this process stands: rank, world size, device (see the module docstring)."""

    def __init__(self, device_name):
        self.enabled = launched_by_torchrun()
        self.device = pick_device(device_name)
        if not self.enabled:
            self.rank, self.world = 0, 1
            return
        import torch.distributed as dist
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DeviceError(f"RANK and WORLD_SIZE are set but {' and '.join(missing)} not: "
                              "start several processes with torchrun, or unset RANK for one")
        try:
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        except ValueError:
            raise DeviceError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} "
                              "must be integers") from None
        if not 0 <= rank < world:              # else init_process_group waits for a rank 0 that never comes
            raise DeviceError(f"RANK={rank} is not one of the WORLD_SIZE={world} processes (0 .. {world - 1})")
        addr = os.environ["MASTER_ADDR"]
        try:                                   # else c10d retries an unknown host until its timeout
            socket.getaddrinfo(addr, None)
        except (socket.gaierror, UnicodeError) as e:
            raise DeviceError(f"MASTER_ADDR={addr!r}: no such host ({e})") from None
        port = os.environ["MASTER_PORT"]
        if not (port.isdigit() and 0 < int(port) < 2 ** 16):
            raise DeviceError(f"MASTER_PORT={port!r} must be a port number (1 .. 65535)")
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        set_timeout = getattr(dist, "set_timeout", None)        # torch >= 2.6
        by_hand = "TORCHELASTIC_RUN_ID" not in os.environ and set_timeout is not None
        hint = (f"; all {world} processes must start within {JOIN_TIMEOUT.seconds} s of each other "
                "(start them with torchrun)" if by_hand and world > 1 else "")
        if by_hand and rank > 0:             # c10d's own wait for rank 0 overshoots its timeout by seconds
            if not answers(addr, int(port), JOIN_TIMEOUT.total_seconds()):
                raise DeviceError(f"could not join the process group (no process 0 answers at {addr}:{port} "
                                  f"after {JOIN_TIMEOUT.seconds} s){hint}")
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        try:                                   # by hand on CUDA: NCCL joins at once (device_id), not at the
            with held_back_stderr():           # first collective, whose wait would keep the short timeout
                dist.init_process_group(backend, timeout=JOIN_TIMEOUT if by_hand else None,
                                        **({"device_id": self.device} if by_hand and backend == "nccl" else {}))
        except (RuntimeError, ValueError) as e:  # DistStoreError, DistNetworkError: peers that never came
            first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise DeviceError(f"could not join the process group ({first}){hint}") from e
        if by_hand:                            # joined: collectives get torch's usual patience back
            from torch.distributed import constants
            usual = getattr(constants, "default_pg_nccl_timeout", None) if backend == "nccl" else None
            set_timeout(usual or constants.default_pg_timeout)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    @property
    def main(self):
        return self.rank == 0

    def wrap(self, model):
        """DistributedDataParallel averages gradients across processes; a no-op for one process."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def any(self, flag):
        """True on every rank if `flag` is true on any rank (so all ranks stop at the same step)."""
        if not self.enabled:
            return flag
        import torch.distributed as dist
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value):
        """Average of a scalar tensor over all ranks (the global batch's loss)."""
        if not self.enabled:
            return value.item()
        import torch.distributed as dist
        t = value.detach().clone().reshape(1)
        dist.all_reduce(t)
        return t.item() / self.world

    def share(self, obj):
        """Rank 0's value of a picklable obj, on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def max_param_difference(self, model):
        """Largest difference between this rank's parameters and rank 0's (0 when in sync)."""
        if not self.enabled:
            return 0.0
        import torch.distributed as dist
        diff = 0.0
        for p in model.parameters():
            ref = p.detach().clone()
            dist.broadcast(ref, src=0)
            diff = max(diff, (p.detach() - ref).abs().max().item())
        t = torch.tensor([diff], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def close(self):
        if self.enabled:
            import torch.distributed as dist
            dist.destroy_process_group()
