"""Experiment trackers beside Prometheus: an optional TensorBoard sink (`logging.tensorboard: true`).

Scalars per step under RUN/tensorboard/: every numeric top-level key of the metrics row (reward_mean,
hack_rate, pass_rate, loss, kl, lr, ...) as `train/<key>`, eval rows as `eval/<key>`, and the phase timings as
`timing/<phase>`. Written through torch's SummaryWriter (the `tensorboard` package: `pip install
projected-grpo[tensorboard]`). A resumed run passes `purge_step`, so TensorBoard drops the killed run's events
after the checkpoint instead of drawing two curves over the same steps.
"""
from __future__ import annotations

import math
import os

from pgrpo.errors import UserError


def check_tensorboard():
    """A start-up check (before --overwrite deletes anything): the package the sink needs is importable."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard is true but the tensorboard package is not installed "
                        "(pip install tensorboard, or set logging.tensorboard: false).") from None
    return SummaryWriter


class TensorBoardSink:
    def __init__(self, run_dir: str, start_step: int = 0):
        SummaryWriter = check_tensorboard()
        self.w = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                               purge_step=start_step + 1 if start_step else None)

    def write(self, row: dict) -> None:
        step = int(row["step"])
        prefix = "eval" if row.get("kind") == "eval" else "train"
        for k, v in row.items():
            if k in ("step", "time", "kind") or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if math.isfinite(v):
                self.w.add_scalar(f"{prefix}/{k}", v, step)
        for k, v in (row.get("timing") or {}).items():
            self.w.add_scalar(f"timing/{k}", v, step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()
