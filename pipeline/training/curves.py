"""Training curves, logged live with DVCLive into the train stage's reports folder:

    reports/train/metrics.json                      the latest epoch's values (`dvc exp show`)
    reports/train/plots/metrics/train/<name>.tsv    loss, lr (clip: temperature) per epoch
    reports/train/plots/metrics/val/<name>.tsv      each validation's numbers; step 0 is the model before training

DVCLive's step is the epoch. Wall-clock times stay out (they go to reports/timing), so the curves
are a function of the params and data alone. Written after every epoch, not at the end, so a
`dvc exp run` can be followed while it trains (DVC's VS Code extension reads these files).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import pandas as pd

from pipeline.errors import UserError

if TYPE_CHECKING:  # the evaluate stage reads curves without importing torch
    from pipeline.training.checkpoints import TrainResult

NOT_CURVES = ("epoch", "epoch_s")  # the step itself, and a wall-clock time


class LiveCurves:
    """`on_epoch` for `loop.fit`: logs the rows `result` gained since the last call."""

    def __init__(self, folder: Path):
        from dvclive import Live  # imported here: only the train stage logs
        from scmrepo.exceptions import SCMError

        try:
            # No dvc.yaml edits (the pipeline declares these files itself) and no experiment of
            # its own: inside `dvc exp run` the run already is one.
            self.live = Live(dir=str(folder), save_dvc_exp=False, dvcyaml=False)
        except SCMError as err:  # DVCLive 3.49 reads HEAD before it checks that there is one
            raise UserError(
                f"DVCLive cannot log the training curves: {err} (a git repository without commits). "
                "Commit once (git add -A && git commit -m start) and run again"
            ) from err
        self.logged = {"train": 0, "val": 0}

    def __call__(self, result: "TrainResult") -> None:
        by_epoch: dict[int, list[tuple[str, dict]]] = {}
        for prefix, rows in (("train", result.loss_rows), ("val", result.val_rows)):
            for row in rows[self.logged[prefix] :]:
                by_epoch.setdefault(row["epoch"], []).append((prefix, row))
            self.logged[prefix] = len(rows)
        for epoch in sorted(by_epoch):
            self.live.step = epoch
            for prefix, row in by_epoch[epoch]:
                for name, value in row.items():
                    if name not in NOT_CURVES:
                        self.live.log_metric(f"{prefix}/{name}", value)
            self.live.next_step()

    def end(self) -> None:
        self.live.end()


def read_curves(folder: Path) -> tuple[Optional[pd.DataFrame], Optional[pd.DataFrame]]:
    """(train, val) per-epoch tables from a curves folder, a column per metric and `epoch`; None when absent."""
    return _read(Path(folder) / "plots" / "metrics" / "train"), _read(Path(folder) / "plots" / "metrics" / "val")


def _read(folder: Path) -> Optional[pd.DataFrame]:
    files = sorted(folder.glob("*.tsv"))
    if not files:
        return None
    table = None
    for file in files:
        column = pd.read_csv(file, sep="\t")
        table = column if table is None else table.merge(column, on="step", how="outer")
    return table.rename(columns={"step": "epoch"}).sort_values("epoch").reset_index(drop=True)
