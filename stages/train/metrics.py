"""Metrics to CSV (always), TensorBoard (when installed), and a PNG of the curves."""
from __future__ import annotations

import csv
from pathlib import Path

from core.atomic import atomic_write_with


class MetricsLog:
    def __init__(self, out: Path, resume: bool):
        self.path = Path(out) / "metrics.csv"
        self.rows: list[dict] = []
        if resume and self.path.exists():
            with open(self.path) as f:
                self.rows = [{k: _num(v) for k, v in r.items()} for r in csv.DictReader(f)]
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter  # lazy: tensorboard is optional

            self.tb = SummaryWriter(str(Path(out) / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def truncate(self, epoch: int) -> None:
        """Forget rows past ``epoch`` (they belong to a run that died before checkpointing)."""
        self.rows = [r for r in self.rows if r["epoch"] <= epoch]

    def log(self, row: dict) -> None:
        self.rows.append(row)
        keys: dict[str, None] = {}
        for r in self.rows:
            keys.update(dict.fromkeys(r))
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(keys))
            w.writeheader()
            w.writerows(self.rows)
        tmp.replace(self.path)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k.replace(".", "/"), v, row["epoch"])
            self.tb.flush()

    def plot(self, path: Path, title: str) -> None:
        import matplotlib  # lazy: matplotlib takes a second to import

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # lazy: matplotlib takes a second to import

        if not self.rows:
            return
        ep = [r["epoch"] for r in self.rows]
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
        axes[0].plot(ep, [r["train_loss"] for r in self.rows], label="train")
        for key, label in (("val_loss_batch", "validation, in training-size batches"),
                           ("val_loss", "validation, whole split (grows like ln N)")):
            if key in self.rows[0]:
                axes[0].plot(ep, [r[key] for r in self.rows], label=label)
        axes[0].set_title("contrastive loss")
        for k in (1, 5, 10):
            for d, ls in (("i2t", "-"), ("t2i", "--")):
                key = f"val_{d}_r@{k}"
                if key in self.rows[0]:
                    axes[1].plot(ep, [r[key] for r in self.rows], ls, label=f"{d} R@{k}")
        axes[1].set_title("validation retrieval recall")
        if not axes[1].lines:
            axes[1].text(0.5, 0.5, "no validation split", ha="center", va="center", transform=axes[1].transAxes)
        axes[2].plot(ep, [r["logit_scale"] for r in self.rows])
        axes[2].set_title("logit scale (exp, clamped at 100)")
        for ax in axes:
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[0].legend()
        if axes[1].lines:
            axes[1].legend(fontsize=7, ncol=2)
        fig.suptitle(title)
        fig.tight_layout()
        atomic_write_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)


def _num(v: str):
    try:
        f = float(v)
        return int(f) if f.is_integer() and "." not in v and "e" not in v else f
    except (TypeError, ValueError):
        return v
