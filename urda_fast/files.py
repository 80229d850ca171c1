"""Result files written so that a kill never leaves half of one: write beside the target, then rename over it.

    atomic_write_text("runs/x/report.md", text); atomic_write_json("runs/x/report.json", report)
    atomic_savefig(fig, "runs/x/report.png", dpi=120)

(Checkpoints: ``urda_fast.run_files.atomic_save``.) And the reading side of checkpoints given on the command line:

    state = load_torch_file(run_checkpoint(path), who="dart")  # a foreign or truncated file: a ValueError naming it
    raise ValueError(f"... ({state_dict_mismatch(err)})")  # load_state_dict's error in one line
"""

from __future__ import annotations

import json
import os
import re
import zipfile


def remove_files(folder: str, names) -> None:
    """Removes ``names`` from ``folder`` where present: before a report's files are written one by one, so that a
    kill between two of them leaves some of the new ones, never a new table beside an old plot."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            os.remove(path)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path``, creating its folder."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def check_out_folder(out: str, who: str) -> None:
    """An ``--out`` that is a file, named before the work whose results it would hold (not after an evaluation)."""
    if out and os.path.exists(out) and not os.path.isdir(out):
        raise NotADirectoryError(f"{who}: --out {out!r} is a file; give a folder for the results")


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def atomic_savefig(fig, path: str, **kwargs) -> None:
    """``fig.savefig(path, **kwargs)``; the temporary name keeps the extension, from which matplotlib picks the
    format."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{ext}"
    fig.savefig(tmp, **kwargs)
    os.replace(tmp, path)


def load_torch_file(path: str, *, who: str, weights_only: bool = False, mmap: bool = False):
    """``torch.load(path)`` onto the CPU. A file torch cannot read -- truncated, or not a checkpoint at all -- fails
    in the unpickler or the zip reader in many ways (UnpicklingError, RuntimeError, EOFError, even OSError "Invalid
    argument" for a cut zip): one ValueError names it. A missing or unreadable path stays the OSError it is.
    ``mmap``: tensors are mapped, not read, so reading a checkpoint's metadata costs no I/O (zip-format files; a
    legacy-format file is read whole)."""
    import torch

    try:
        mmap = mmap and zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except Exception as err:  # noqa: BLE001 -- see the docstring
        raise ValueError(f"{who}: {path!r} is not a checkpoint torch can read ({reading_error(err)}); is it the "
                         "right file, and was it copied whole?") from err


def run_checkpoint(path: str) -> str:
    """The checkpoint a command-line argument names: a run folder means its ``best.pt``, anything else itself."""
    return os.path.join(path, "best.pt") if os.path.isdir(path) else path


def missing_best_hint(path: str) -> str:
    """For a folder given as a run without best.pt: what it holds instead, for the not-found error ("" otherwise)."""
    if not os.path.isdir(path):
        return ""
    last = os.path.join(path, "last.pt")
    if os.path.isfile(last):
        return f" (the folder has no best.pt, only last.pt: a run stopped before its first evaluation? give {last})"
    return " (the folder holds no best.pt or last.pt: not a run folder, or a run that has written no checkpoint yet)"


def reading_error(err: Exception) -> str:
    """``Type: first line`` of an error from a file reader (unpicklers' messages run to many lines)."""
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"


_KEY_LIST = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.?\s*$", re.M)
_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:]+): copying a param with shape torch\.Size\((\[[^\]]*\])\) "
                            r"from checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")


def state_dict_mismatch(err: Exception, shown: int = 3) -> str:
    """``load_state_dict``'s error (every missing and unexpected key, one line per shape mismatch: hundreds of
    names for a checkpoint of another model) as counts with the first ``shown`` names of each kind."""
    text = str(err)
    parts = []
    for kind, keys in _KEY_LIST.findall(text):
        names = re.findall(r'"([^"]+)"', keys)
        more = ", ..." if len(names) > shown else ""
        parts.append(f"{len(names)} {kind.lower()} key(s): {', '.join(names[:shown])}{more}")
    sizes = _SIZE_MISMATCH.findall(text)
    if sizes:
        listed = ", ".join(f"{name} {got} in the file vs {want} here" for name, got, want in sizes[:shown])
        parts.append(f"{len(sizes)} shape mismatch(es): {listed}{', ...' if len(sizes) > shown else ''}")
    return "; ".join(parts) if parts else text.strip()[:300]
