"""Result files written so that a kill never leaves half of one: write beside the target, then rename over it.

    atomic_write_text("runs/x/report.md", text); atomic_write_json("runs/x/report.json", report)
    atomic_savefig(fig, "runs/x/report.png", dpi=120)

(Checkpoints: ``urda_fast.train.atomic_save``.)
"""

from __future__ import annotations

import json
import os


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_savefig(fig, path: str, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)``; the temporary name keeps the extension, from which matplotlib picks the
    format."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)
