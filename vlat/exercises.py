"""The notebooks' exercises: check what you wrote against vlat, grade an answer, make a copy to practise on.

Each method notebook has a *write it yourself* cell: the core loop of the method, with its key lines
marked ``# ←``. The notebooks ship with those lines filled in, so that they run top to bottom (CI runs
them). To practise, make a copy with the marked lines blanked::

    python -m vlat.exercises notebooks/02_pgd.ipynb my_02_pgd.ipynb

A blanked line keeps its left-hand side and its comment (``loss = ...  # ← the loss at x + δ``); fill
in the right-hand side. The check cell after it compares your result with vlat's implementation on the
same batch (:func:`check`), and the graded exercises at the end of each notebook compare a number you
work out with the one the code measures (:func:`grade`). Neither raises: each prints what it found.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

MARK = "# ←"


def _flat(x) -> dict[str, torch.Tensor]:
    """A tensor, a number, or a dict of them, as named float tensors."""
    if isinstance(x, dict):
        return {str(k): torch.as_tensor(v).detach().float().cpu() for k, v in x.items()}
    return {"": torch.as_tensor(x).detach().float().cpu()}


def check(what: str, yours, reference, atol: float = 1e-5, rtol: float = 1e-4, hint: str = "") -> bool:
    """Compare ``yours`` with ``reference`` (tensors, numbers, or dicts of them, e.g. ``{site: δ}``), print
    ``✓`` or the largest difference and where it is, and return whether they agree within
    ``atol + rtol |reference|``."""
    a, b = _flat(yours), _flat(reference)
    if a.keys() != b.keys():
        print(f"✗ {what}: you have {sorted(a)} but the reference has {sorted(b)}")
        return False
    ok = True
    for k in b:
        name = f"{what}[{k}]" if k else what
        if a[k].shape != b[k].shape:
            print(f"✗ {name}: shape {tuple(a[k].shape)}, expected {tuple(b[k].shape)}")
            ok = False
            continue
        if not torch.isfinite(a[k]).all():
            print(f"✗ {name}: holds NaN or inf")
            ok = False
            continue
        diff = (a[k] - b[k]).abs()
        bad = diff > atol + rtol * b[k].abs()
        if bad.any():
            where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
            print(f"✗ {name}: differs at {int(bad.sum())} of {bad.numel()} entries; largest |difference| "
                  f"{float(diff.max()):.3g} at index {where} (yours {float(a[k][where]):.4g}, "
                  f"reference {float(b[k][where]):.4g})" + (f". Hint: {hint}" if hint else ""))
            ok = False
        else:
            print(f"✓ {name}: matches (largest |difference| {float(diff.max()):.1e})")
    return ok


def grade(label: str, answer, expected, tol: float = 1e-3, hint: str = "") -> bool:
    """Grade an exercise: ``answer`` (a number or tensor you worked out) against ``expected`` (what the code
    measures), within ``tol`` (absolute, or relative for large values). ``...`` or ``None`` means not answered yet."""
    if answer is ... or answer is None:
        print(f"· {label}: not answered yet (replace the ... with your answer)")
        return False
    a, b = torch.as_tensor(answer, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64)
    if a.shape != b.shape:
        print(f"✗ {label}: an answer of shape {tuple(a.shape)}, expected {tuple(b.shape)}")
        return False
    close = ((a - b).abs() <= tol * torch.clamp(b.abs(), min=1.0)).flatten()
    ok = bool(close.all())
    shown = f"{float(a):.4g}" if a.numel() == 1 else str([round(v, 4) for v in a.flatten().tolist()][:8])
    if ok:
        print(f"✓ {label}: {shown}")
    else:
        if b.numel() == 1:
            print(f"✗ {label}: {shown} is not {float(b):.4g}" + (f". Hint: {hint}" if hint else ""))
        else:
            wrong = [i for i, c in enumerate(close.tolist()) if not c]
            print(f"✗ {label}: {shown} is wrong at entry {', '.join(map(str, wrong[:5]))}" +
                  (f". Hint: {hint}" if hint else ""))
    return ok


def blank(source: str) -> str:
    """``source`` with every line marked ``# ←`` blanked: an assignment keeps its left-hand side
    (``x = ...  # ← comment``), any other line becomes ``...  # ← comment``."""
    out = []
    for line in source.splitlines():
        if MARK not in line:
            out.append(line)
            continue
        code, comment = line.split(MARK, 1)
        indent = code[: len(code) - len(code.lstrip())]
        m = re.match(r"^(\s*[\w\s,().\[\]]+?)\s*(?<![=!<>+\-*/])=(?!=)", code)
        head = m.group(1).strip() + " = " if m else "return " if code.lstrip().startswith("return ") else ""
        out.append(f"{indent}{head}...  {MARK}{comment}")
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def blank_notebook(src: str | Path, dst: str | Path) -> int:
    """Write a copy of notebook ``src`` with its marked lines blanked (outputs cleared); returns how many."""
    import nbformat

    nb = nbformat.read(str(src), as_version=4)
    count = 0
    for cell in nb.cells:
        if cell.cell_type == "code":
            count += sum(MARK in line for line in cell.source.splitlines())
            cell.source = blank(cell.source)
            cell.outputs, cell.execution_count = [], None
    if not count:
        raise ValueError(f"{src}: no line is marked {MARK!r}: nothing to blank")
    nbformat.write(nb, str(dst))
    return count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlat.exercises",
                                 description="copy a notebook with its exercise lines (marked # ←) blanked")
    ap.add_argument("notebook")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    if Path(a.out).resolve() == Path(a.notebook).resolve():
        ap.error("write the copy somewhere else: the notebook itself keeps its solutions")
    print(f"blanked {blank_notebook(a.notebook, a.out)} lines; open {a.out} and fill them in")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
