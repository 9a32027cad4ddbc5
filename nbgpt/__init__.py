"""nbgpt: a notebook-first reproduction of GPT-2 (124M).

The notebooks in `notebooks/` tell the story; this package holds the machinery they call.
"""

__version__ = "0.1.0"
