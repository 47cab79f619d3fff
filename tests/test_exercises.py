"""vlat.exercises: the check and grade helpers the notebooks' exercises use, and the learner's blanked copy."""

import nbformat
import pytest
import torch

from vlat.exercises import blank, blank_notebook, check, grade, main


def test_check_says_match_or_where_it_differs(capsys):
    ref = torch.arange(6.0).view(2, 3)
    assert check("δ", ref.clone(), ref)
    assert "✓ δ: matches" in capsys.readouterr().out
    wrong = ref.clone()
    wrong[1, 2] += 0.5
    assert not check("δ", wrong, ref, hint="look at the projection")
    out = capsys.readouterr().out
    assert "✗ δ: differs at 1 of 6 entries" in out and "(1, 2)" in out and "yours 5.5" in out and "projection" in out
    assert not check("δ", ref[:1], ref)
    assert "shape (1, 3), expected (2, 3)" in capsys.readouterr().out
    assert not check("δ", torch.full((2, 3), float("nan")), ref)
    assert check("deltas", {"text": ref, "image": ref * 2}, {"text": ref, "image": ref * 2})
    assert not check("deltas", {"text": ref}, {"image": ref})


def test_grade_within_tolerance_and_unanswered(capsys):
    assert grade("Q1", 0.1001, 0.1, tol=1e-3)
    assert not grade("Q2", 0.2, 0.1, hint="ε is a fraction")
    assert not grade("Q3", ..., 0.1)
    out = capsys.readouterr().out
    assert "✓ Q1" in out and "✗ Q2: 0.2 is not 0.1. Hint: ε is a fraction" in out and "not answered yet" in out
    assert grade("Q4", 1000.5, 1000.0, tol=1e-3)                    # relative for large values
    assert grade("Q5", [1.0, 2.0], torch.tensor([1.0, 2.0]))
    assert not grade("Q6", [1.0, 2.5, 3.0], [1.0, 2.0, 3.0])
    assert "wrong at entry 1" in capsys.readouterr().out


def test_blank_keeps_the_left_hand_side_and_the_hint():
    src = ("def f(model, delta):\n"
           "    loss = model(delta).loss                 # ← the loss at x + δ\n"
           "    (g,) = torch.autograd.grad(loss, delta)  # ← its gradient\n"
           "    if a == b:\n"
           "        return g.sign()                      # ← the step's direction\n"
           "    return g\n")
    out = blank(src)
    assert "    loss = ...  # ← the loss at x + δ\n" in out and "    (g,) = ...  # ← its gradient\n" in out
    assert "        return ...  # ← the step's direction\n" in out and "    if a == b:\n" in out
    assert "autograd" not in out and out.count("\n") == src.count("\n")


def test_a_notebook_copy_has_its_marked_lines_blanked(tmp_path, capsys):
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "notebooks" / "02_pgd.ipynb"
    marks = sum(line.count("# ←") for c in nbformat.read(src, as_version=4).cells if c.cell_type == "code"
                for line in c.source.splitlines())
    assert marks >= 4
    assert main([str(src), str(tmp_path / "mine.ipynb")]) == 0
    assert f"blanked {marks} lines" in capsys.readouterr().out
    copy = nbformat.read(tmp_path / "mine.ipynb", as_version=4)
    code = "\n".join(c.source for c in copy.cells if c.cell_type == "code")
    assert "torch.autograd.grad(loss, delta)" not in code and code.count("...  # ←") == marks
    with pytest.raises(SystemExit):
        main([str(src), str(src)])                                  # never overwrite the solutions
    empty = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(empty, tmp_path / "plain.ipynb")
    with pytest.raises(ValueError, match="no line is marked"):
        blank_notebook(tmp_path / "plain.ipynb", tmp_path / "out.ipynb")
