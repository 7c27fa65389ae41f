"""Data parallelism over torch.distributed: one experiment on N ranks (`torchrun --nproc_per_node N -m pgrpo train`).

Why no DDP/FSDP wrapper: the model is frozen and the only trainable tensor is the flat fp32 knob delta_S
(R entries; 534,528 for Qwen3-4B, ~2 MB). Every rank holds the whole (frozen) model, generates, grades and
back-propagates its share of the step's prompt groups, turns its weight gradients into a delta_S gradient
with the basis change (local, before any communication), and then ONE all-reduce of R floats sums the
ranks' contributions. DDP would all-reduce parameter grads bucket by bucket during backward; here there are
no parameter grads to reduce, only the flat knob gradient after the basis change.

What lives here (train.py calls these at a few marked points):
- `init`: the process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT),
  NCCL on CUDA (each rank on cuda:LOCAL_RANK) plus a gloo group for Python objects, gloo on CPU; every
  collective has a timeout (`dist_timeout_s`). Without torchrun (WORLD_SIZE unset or 1) a `Comm` is a
  no-op and the trainer is exactly the single-process one.
- `Comm.shard`: this rank's contiguous slice of the step's groups. The data order is global (one seeded
  permutation), so the step's prompts are the same whatever the rank count.
- `group_seed`: the sampling seed of one generate call, from (seed, step, global index of its first group):
  the same groups draw the same samples on 1 or N ranks (when each rank's share is a multiple of
  rollout.groups_per_generate; always with groups_per_generate 1). Global group 0 keeps the seed a
  single-process run always used (seed * 1000003 + step), so 1-rank runs are unchanged.
- `Comm.exchange`: all-gather of every rank's groups and grader results after the reward phase (rank 0 builds
  the metrics row over the whole global batch; every rank computes the advantages, skipped groups and the
  `loss_norm: token` denominator of the global batch), and the per-step error flag: a rank whose rollout or
  grading failed reports it here and every rank stops with the same sentence.
- `Comm.reduce_grad`: the all-reduce (sum) of the flat gradient plus the step's loss statistics. Projection,
  clipping, AdamW and project_update run after it, identically on every rank (one-sided projection is not
  linear: projecting partial gradients would be a different experiment).
- `Comm.main_only`: run a function on rank 0 only (run-dir set-up, checkpoint load/save) and hand its result
  (or its UserError) to every rank, so all ranks resume from the same checkpoint and fail together.
- failure anywhere else: the failing rank leaves its message in torchrun's key-value store before it exits; a
  rank whose collective then fails (the peer is gone) or times out raises `RankFailed` naming the rank and
  the reason. torchrun itself (`--max-restarts 0`, its default) stops the remaining ranks when one exits.
"""
from __future__ import annotations

import datetime
import hashlib
import os
import time

import torch

from pgrpo.errors import UserError

def _err_key() -> str:   # one per torchrun attempt, so a restarted group never reads an old reason
    return f"pgrpo/failed/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


class RankFailed(UserError):
    """Another rank stopped (its error, or that it vanished), so this one stops too."""


def group_seed(seed: int, step: int, group: int) -> int:
    """Seed of the generate call whose first group has global index `group` in `step`. Unique per
    (step, group) while seed * 1000003 + step < 2**32; group 0 keeps the single-process formula."""
    return seed * 1000003 + step + (group << 32)


class Comm:
    """This process's place in the job. A default Comm() is the single-process world (every method a no-op)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str | None = None,
                 cpu_group=None, timeout_s: float = 1800.0):
        self.rank, self.world, self.local_rank, self.backend = rank, world, local_rank, backend
        self.cpu_group = cpu_group          # gloo group for Python objects (the default group on CPU)
        self.timeout_s = timeout_s
        self.step = 0                       # for error messages
        self.tally = {}                     # grader outcomes on this rank since the last exchange (rank > 0)
        self.peer_tallies = []              # rank 0: the other ranks' tallies from the last exchange
        self.timing = {}                    # seconds of this step's communication (the row's timing keys)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def tag(self) -> str:
        return f" (rank {self.rank}/{self.world})" if self.distributed else ""

    def device(self, device: str) -> str:
        """The trainer's device on this rank: cuda:LOCAL_RANK when distributed on CUDA."""
        if self.distributed and device.startswith("cuda"):
            return f"cuda:{self.local_rank}"
        return device

    # ------------------------------------------------------------------ sharding
    def shard(self, n: int) -> tuple[int, int]:
        """[lo, hi) of n items for this rank: contiguous, sizes differ by at most one, earlier ranks larger."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    # ------------------------------------------------------------------ failures
    def _store(self):
        try:
            import torch.distributed.distributed_c10d as c10d
            return c10d._get_default_store()
        except Exception:  # no store (not initialised, or torch moved the helper): only the generic message
            return None

    def report_failure(self, err: BaseException) -> None:
        """Leave this rank's reason in the job's key-value store (called on the way out of a failing rank)."""
        if not self.distributed or isinstance(err, (RankFailed, KeyboardInterrupt)):
            return
        store = self._store()
        if store is not None:
            try:
                store.set(_err_key(), f"rank {self.rank} stopped at step {self.step}: {_one_line(err)}")
            except Exception:
                pass

    def _failed(self, what: str, err: Exception) -> RankFailed:
        """A collective failed: name the rank that caused it when it left its reason in the store."""
        reason = None
        store = self._store()
        if store is not None:
            try:
                if store.check([_err_key()]):   # a failing rank writes it before it exits, so before we notice
                    reason = store.get(_err_key()).decode("utf-8", "replace")
            except Exception:
                reason = None
        if reason:
            return RankFailed(f"{reason} (rank {self.rank} stops too)")
        timed_out = "timeout" in str(err).lower() or "timed out" in str(err).lower()
        why = (f"no answer from the other ranks for {self.timeout_s:g}s (dist_timeout_s)" if timed_out else
               "another rank died or was killed (torchrun's failure summary names it)")
        return RankFailed(f"rank {self.rank} lost the other ranks during {what} at step {self.step}: {why} "
                          f"[{_one_line(err)}]")

    def _run(self, what, fn):
        try:
            return fn()
        except RankFailed:
            raise
        except (RuntimeError, ValueError, ConnectionError, OSError) as e:  # gloo/NCCL errors are RuntimeErrors
            raise self._failed(what, e) from None

    # ------------------------------------------------------------------ collectives
    def all_gather(self, obj, what: str = "a gather") -> list:
        if not self.distributed:
            return [obj]
        import torch.distributed as tdist
        out = [None] * self.world
        self._run(what, lambda: tdist.all_gather_object(out, obj, group=self.cpu_group))
        return out

    def broadcast(self, obj, what: str = "a broadcast"):
        """rank 0's obj on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as tdist
        box = [obj if self.is_main else None]
        self._run(what, lambda: tdist.broadcast_object_list(box, src=0, group=self.cpu_group))
        return box[0]

    def main_only(self, fn, what: str = "rank 0's work"):
        """fn() on rank 0; its result (or its UserError, raised on every rank) everywhere."""
        if not self.distributed:
            return fn()
        res, err = None, None
        if self.is_main:
            try:
                res = fn()
            except UserError as e:
                err = str(e)
        res, err = self.broadcast((res, err) if self.is_main else None, what)
        if err is not None:
            raise UserError(err) if self.is_main else RankFailed(f"rank 0: {err}")
        return res

    def exchange(self, groups: list, results: list, failure: BaseException | None):
        """After the reward phase: (all groups, all results) of the step in global group order, on every
        rank (this rank's own objects in its slots). Also the step's error flag: if any rank failed this
        step, every rank raises here (the failing rank its own exception, the others RankFailed)."""
        if not self.distributed:
            if failure is not None:
                raise failure
            return groups, results
        t0 = time.perf_counter()
        tally, self.tally = self.tally, {}
        mine = {"groups": groups if failure is None else [], "results": results if failure is None else [],
                "error": None if failure is None else _one_line(failure), "tally": tally}
        got = self.all_gather(mine, "the exchange of rollouts and rewards")
        bad = [(r, g["error"]) for r, g in enumerate(got) if g["error"] is not None]
        if bad:
            if failure is not None:
                raise failure
            r, msg = bad[0]
            raise RankFailed(f"rank {r} stopped at step {self.step}: {msg} (rank {self.rank} stops too)")
        all_groups, all_results = [], []
        for r, g in enumerate(got):
            all_groups += groups if r == self.rank else g["groups"]
            all_results += results if r == self.rank else g["results"]
        self.peer_tallies = [g["tally"] for r, g in enumerate(got) if r != self.rank]
        self.timing["exchange"] = time.perf_counter() - t0
        return all_groups, all_results

    def peer_outcomes(self):
        """(outcome, count) of the other ranks' grader requests since the last exchange (rank 0 counts them)."""
        for tally in self.peer_tallies if self.is_main else []:
            yield from tally.items()
        self.peer_tallies = []

    def pop_timing(self) -> dict:
        """This step's communication seconds: exchange (the all-gather after grading, including the wait for
        the slowest rank), sync (the wait before the all-reduce) and allreduce; empty on one rank."""
        t, self.timing = self.timing, {}
        return t

    def count_outcome(self, outcome: str) -> None:
        """Grader outcomes of a rank > 0, handed to rank 0's Prometheus counters at the next exchange."""
        self.tally[outcome] = self.tally.get(outcome, 0) + 1

    def reduce_grad(self, grad: torch.Tensor, stats: list[float]):
        """Sum the flat delta_S gradient (in place) and the step's loss statistics over the ranks; returns
        (grad, summed stats); the seconds go to `pop_timing`. One all-reduce: the statistics ride along as
        R + len(stats) floats. A barrier first, so the time spent waiting for the slowest rank (load imbalance)
        is measured apart from the all-reduce itself.
        The addition order differs from a single process summing all groups (each rank's basis change runs
        on its own partial G_W), so N-rank gradients equal the 1-rank ones to fp32 rounding, not bitwise."""
        if not self.distributed:
            return grad, stats
        import torch.distributed as tdist
        t0 = time.perf_counter()
        buf = torch.cat([grad.detach().reshape(-1).float(),
                         torch.tensor(stats, dtype=torch.float32, device=grad.device)])
        if grad.is_cuda:
            torch.cuda.synchronize(grad.device)
        self._run("the pre-all-reduce barrier", lambda: tdist.barrier(group=self.cpu_group))
        t1 = time.perf_counter()
        self._run("the gradient all-reduce", lambda: tdist.all_reduce(buf, op=tdist.ReduceOp.SUM))
        with torch.no_grad():
            grad.copy_(buf[:grad.numel()].view_as(grad))
        out = buf[grad.numel():].tolist()   # .tolist() waits for the (NCCL) all-reduce
        self.timing.update(sync=t1 - t0, allreduce=time.perf_counter() - t1)
        return grad, out

    def all_reduce_rows(self, rows: torch.Tensor, what: str = "a gather") -> torch.Tensor:
        """Concatenate every rank's [n_r, R] rows in rank order (v_hack extraction's per-pair gradients)."""
        if not self.distributed:
            return rows
        parts = self.all_gather(rows.detach().cpu(), what)
        return torch.cat(parts)

    def assert_same(self, t: torch.Tensor, what: str) -> None:
        """Every rank must hold the same bits (the knob after an identical update on every rank)."""
        if not self.distributed:
            return
        h = hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
        hashes = self.all_gather(h, f"the {what} check")
        if len(set(hashes)) != 1:
            raise RankFailed(f"the ranks' {what} diverged at step {self.step} (an update that was not identical "
                             f"on every rank); stopping rather than training different models.")

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as tdist
            if tdist.is_initialized():
                try:
                    tdist.destroy_process_group()
                except Exception:
                    pass


def _one_line(err: BaseException) -> str:
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0] if msg else ''}" if not isinstance(err, UserError) else (msg[0] if msg else "")


def init(device: str = "auto", timeout_s: float = 1800.0) -> Comm:
    """The Comm for this process: the single-process world unless torchrun set WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Comm(timeout_s=timeout_s)
    import sys
    import torch.distributed as tdist
    for stream in (sys.stdout, sys.stderr):   # N ranks share one terminal/pipe: one write per line, never a
        try:                                  # line of rank 0 torn by a line of rank 1
            stream.reconfigure(line_buffering=True, write_through=False)
        except (AttributeError, ValueError):
            pass
    try:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except (KeyError, ValueError):
        raise UserError("WORLD_SIZE is set but RANK is not; launch distributed runs with torchrun.") from None
    cuda = device != "cpu" and torch.cuda.is_available()
    if device.startswith("cuda") and not cuda:
        raise UserError("config key device asks for cuda, but no CUDA device is available.")
    if cuda:
        if local >= torch.cuda.device_count():
            raise UserError(f"rank {rank} has LOCAL_RANK {local} but this node shows only {torch.cuda.device_count()} "
                            f"GPU(s); start at most that many processes per node (--nproc_per_node).")
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if not tdist.is_initialized():
        tdist.init_process_group(backend, timeout=timeout)
    cpu_group = tdist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return Comm(rank, world, local, backend, cpu_group, timeout_s)


class NullLog:
    """metrics.jsonl stand-in for ranks > 0: rank 0 alone writes the run's rows."""

    def write(self, row: dict) -> None:
        pass

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- rollout helpers

def generate_shard(model, tok, prompts: list, indices: list, lo: int, rollout_cfg, device, seed: int, step: int):
    """This rank's groups (global positions lo, lo + 1, ...), one generate call per `rollout.groups_per_call`
    groups (= groups_per_generate when memory does not bind), each seeded by `group_seed` of its first group's
    global position."""
    from pgrpo import rollout
    if not prompts:
        return []
    out, k = [], rollout.groups_per_call(model, prompts, rollout_cfg, device)
    for s in range(0, len(prompts), k):
        torch.manual_seed(group_seed(seed, step, lo + s))
        out += rollout.generate_groups(model, tok, prompts[s:s + k], indices[s:s + k], rollout_cfg, device)
    return out


def mix_teacher_global(groups: list, lo: int, all_indices: list, problem_ids: list, pool: dict, mix: float, tok,
                       rng, group_size: int) -> int:
    """rollout.mix_teacher over the step's global group list, so its random draws are the 1-rank ones: the
    other ranks' groups are stood in for by empty placeholders (the draws depend only on the problem and G)."""
    from pgrpo import rollout
    if mix <= 0 or not pool:
        return 0
    full = [rollout.Group(pi, [], [[] for _ in range(group_size)], [""] * group_size, [False] * group_size)
            for pi in all_indices]
    full[lo:lo + len(groups)] = groups
    return rollout.mix_teacher(full, problem_ids, pool, mix, tok, rng)


# ----------------------------------------------------------------------------- all-reduce micro-benchmark

def _bench_allreduce(argv=None) -> int:
    """`torchrun --nproc_per_node N -m pgrpo.dist --numel R`: median all-reduce time of R fp32 floats."""
    import argparse
    ap = argparse.ArgumentParser(prog="python -m pgrpo.dist")
    ap.add_argument("--numel", type=int, default=534528)
    ap.add_argument("--repeats", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    comm = init("cpu")
    try:
        x = torch.randn(a.numel)
        import torch.distributed as tdist
        times = []
        for _ in range(a.repeats + 2):
            tdist.barrier()
            t0 = time.perf_counter()
            tdist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        times = sorted(times[2:])
        if comm.is_main:
            print(f"ALLREDUCE numel={a.numel} ranks={comm.world} backend={comm.backend} "
                  f"median={times[len(times) // 2] * 1e3:.3f}ms min={times[0] * 1e3:.3f}ms", flush=True)
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(_bench_allreduce())
