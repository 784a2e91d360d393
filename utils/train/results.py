"""Per-epoch results: `results.csv` (YOLOv5 column names), `results.png`, and console formatting.

results.csv has one row per finished epoch, columns `RESULT_COLUMNS` in that order; numbers are
written with `%.5g`-like precision. Losses are per-image means, LRs the value used in that epoch.
"""
from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path

from utils.train.files import atomic_write, atomic_write_text

RESULT_COLUMNS = (
    "epoch",
    "train/box_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)
LOSS_NAMES = ("box_loss", "obj_loss", "cls_loss")


def append_results(csv_path: str | Path, row: dict[str, float]) -> None:
    """Add one epoch's row; write the header first when the file is new.

    `row` must hold every key of RESULT_COLUMNS (missing ones raise KeyError naming them). The file is
    rewritten whole and atomically (a few kB), so a full disk or a second run writing the same folder
    never leaves a half row: the file holds the rows before this call, or those and this one.
    """
    csv_path = Path(csv_path)
    missing = [c for c in RESULT_COLUMNS if c not in row]
    if missing:
        raise KeyError(f"append_results: row misses columns {missing}")
    old = ""
    if csv_path.exists():
        with csv_path.open(newline="") as f:  # keep the csv module's \r\n line ends as they are
            old = f.read()
    buf = io.StringIO()
    w = csv.writer(buf)
    if not old.strip():
        old = ""
        w.writerow(RESULT_COLUMNS)
    elif not old.endswith("\n"):
        old += "\r\n"
    w.writerow([int(row["epoch"])] + [f"{float(row[c]):.5g}" for c in RESULT_COLUMNS[1:]])
    atomic_write_text(csv_path, old + buf.getvalue())


def read_results(csv_path: str | Path) -> list[dict[str, float]]:
    """Rows of results.csv as dicts of floats (`epoch` as int); ValueError naming a malformed row."""
    csv_path = Path(csv_path)
    rows = []
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        for n, r in enumerate(reader, start=2):  # line 1 is the header
            try:
                d = {k.strip(): float(v) for k, v in r.items() if k is not None and v not in (None, "")}
            except ValueError as e:
                raise ValueError(f"{csv_path}:{n}: malformed results row ({e})") from None
            if "epoch" not in d:
                raise ValueError(f"{csv_path}:{n}: row has no epoch")
            d["epoch"] = int(d["epoch"])
            rows.append(d)
    return rows


def truncate_results(csv_path: str | Path, keep_before_epoch: int) -> int:
    """Keep only rows with `epoch < keep_before_epoch` (a resumed run re-does later epochs); return rows kept.

    A crash between writing an epoch's row and its checkpoint would otherwise leave a duplicate row.
    """
    csv_path = Path(csv_path)
    if not csv_path.exists():
        return 0
    with csv_path.open(newline="") as f:
        lines = list(csv.reader(f))
    if not lines:
        return 0
    header, body = lines[0], [r for r in lines[1:] if r and r[0].strip().lstrip("-").isdigit()]
    kept = [r for r in body if int(r[0]) < keep_before_epoch]
    atomic_write(csv_path, lambda f: csv.writer(f).writerows([header] + kept))
    return len(kept)


def plot_results(csv_path: str | Path, out: str | Path | None = None) -> Path:
    """Draw results.png (2 x 6 panels: train/val losses, P, R, mAPs, LR) next to the CSV; return its path."""
    import matplotlib  # local: keep import of this module cheap and headless-safe

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    csv_path = Path(csv_path)
    out = Path(out) if out else csv_path.with_name("results.png")
    rows = read_results(csv_path)
    panels = ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
              "x/lr0", "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5",
              "metrics/mAP_0.5:0.95", "fitness")
    fig, axes = plt.subplots(2, 6, figsize=(18, 6), tight_layout=True)
    x = [r["epoch"] for r in rows]
    for ax, key in zip(axes.ravel(), panels):
        if key == "fitness":
            y = [0.1 * r.get("metrics/mAP_0.5", 0.0) + 0.9 * r.get("metrics/mAP_0.5:0.95", 0.0) for r in rows]
        else:
            y = [r.get(key, math.nan) for r in rows]
        ax.plot(x, y, marker=".", linewidth=2, markersize=6, label="results")
        if len(y) >= 5:  # a moving average helps read noisy loss curves
            k = max(len(y) // 5, 2)
            sm = [sum(y[max(0, i - k + 1):i + 1]) / len(y[max(0, i - k + 1):i + 1]) for i in range(len(y))]
            ax.plot(x, sm, ":", label="smooth", linewidth=2)
        ax.set_title(key, fontsize=11)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0, 0].legend()
    atomic_write(out, lambda f: fig.savefig(f, dpi=120, format="png"), mode="wb")
    plt.close(fig)
    return out


def epoch_header() -> str:
    """Column titles of the per-epoch progress bar."""
    return ("%11s" * 7) % ("Epoch", "GPU_mem", *LOSS_NAMES, "Instances", "Size")


def epoch_desc(epoch: int, epochs: int, mem: str, mloss: Sequence[float], n_instances: int, imgsz: int) -> str:
    """Progress-bar description aligned under `epoch_header()`; `epoch` is 0-based, shown 1-based."""
    return ("%11s" * 2 + "%11.4g" * 3 + "%11d" * 2) % (f"{epoch + 1}/{epochs}", mem, *mloss, n_instances, imgsz)

