"""nbgpt.show: the notebooks display the library's real source, read from its file at run time."""

from pathlib import Path

import pytest

from nbgpt.model import GPT, Block
from nbgpt.show import show

ROOT = Path(__file__).resolve().parents[1]


def test_show_gives_the_source_as_it_is_in_the_file_with_where_it_starts():
    shown = show(GPT.forward)
    title, code = repr(shown).split("\n", 1)
    line = int(title.rsplit("line ", 1)[1].rstrip(")"))
    assert title.startswith("# nbgpt.model.GPT.forward  (nbgpt/model.py, line ")
    file_lines = (ROOT / "nbgpt" / "model.py").read_text().splitlines()
    assert file_lines[line - 1].strip() == code.splitlines()[0].strip() and code.startswith("def forward(self")
    assert "    " + code.splitlines()[-1] == file_lines[line - 2 + len(code.splitlines())]  # dedented by one level
    markdown = show(Block)._repr_markdown_()
    assert markdown.startswith("`nbgpt.model.Block  (nbgpt/model.py, line ") and "\n```python\nclass Block(" in markdown
    assert markdown.endswith("\n```") and "def forward(self, x, rope, cache):" in markdown


def test_show_refuses_what_has_no_python_source():
    import torch

    with pytest.raises(TypeError, match="show\\(\\) takes a class, function or method written in Python; "
                                        "<built-in method cat of type object at 0x[0-9a-f]+> has no Python source"):
        show(torch.cat)
