"""PNG figures for the command line (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _img(t):
    t = t.detach().cpu().float()
    return t[0].numpy() if t.dim() == 3 else t.numpy()


def image_rows(rows: dict, path: str, title: str | None = None, cmap: str = "gray", vmax=None) -> str:
    """A grid: one row per entry of ``rows`` (label -> (N, C, H, W) or (N, H, W) tensor)."""
    plt = _plt()
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 1.2, 1.25 * len(rows) + (0.4 if title else 0)),
                             squeeze=False)
    for r, (label, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(imgs):
                is_map = "map" in label or "error" in label
                ax.imshow(_img(imgs[c]), cmap="inferno" if is_map else cmap, vmin=0,
                          vmax=(vmax if is_map else 1) if (vmax is not None or not is_map) else None)
            if c == 0:
                ax.set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def loss_curve(curves: dict, path: str, title: str = "training loss", xlabel: str = "epoch",
               steps: dict | None = None) -> str:
    """Per-epoch mean losses (markers at epoch ends); ``steps`` adds each run's per-step losses
    (faint) and their running mean, on the same epoch axis."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for i, (label, ys) in enumerate(curves.items()):
        color = f"C{i}"
        per_step = (steps or {}).get(label)
        if per_step:
            x = np.arange(1, len(per_step) + 1) * len(ys) / len(per_step)
            ax.plot(x, per_step, color=color, alpha=0.25, linewidth=0.8)
            w = max(1, len(per_step) // 25)
            smooth = np.convolve(per_step, np.ones(w) / w, mode="valid")
            ax.plot(x[w - 1:], smooth, color=color, linewidth=1.2, label=f"{label} (per step, running mean)")
        ax.plot(range(1, len(ys) + 1), ys, "o", color=color, markersize=4,
                label=f"{label} (epoch mean)" if per_step else label,
                linestyle="none" if per_step else "-")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    return path


def scatter_codes(points, labels, path: str, title: str) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    sc = ax.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=5)
    fig.colorbar(sc, ax=ax)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    return path


def _save(fig, path):
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
