"""The prompt panel driven as Python objects: set values, click, read what it shows."""

import html
import time

import pytest
import torch

from nbgpt.generate import SamplingConfig
from nbgpt.model import GPT, GPTConfig
from nbgpt.tokenizer import CharTokenizer
from nbgpt.widgets import prompt_panel

TEXT = "to be or not to be, that is the question.\n"


@pytest.fixture
def panel():
    tok = CharTokenizer.from_text(TEXT)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32))
    return prompt_panel(model, tok, prompt="to be")


def test_panel_has_the_controls(panel):
    kinds = {type(w).__name__ for w in panel.children}
    assert {"Textarea", "FloatSlider", "IntSlider", "Text", "HBox", "HTML"} <= kinds
    assert panel.generate_button.description == "Generate" and panel.stop_button.description == "Stop"
    buttons = next(w for w in panel.children if type(w).__name__ == "HBox")
    assert panel.status not in buttons.children, "the status line has a row of its own"
    assert panel.seed.value == "random"


def test_generate_streams_text_and_reports_speed(panel):
    panel.max_tokens.value = 30
    panel.temperature.value = 0.0
    panel.generate_button.click()
    assert panel.wait(30)
    expected = panel.generator.complete("to be", SamplingConfig(max_new_tokens=30, temperature=0.0, top_k=50))
    assert panel.text == expected and len(expected) > 0
    # The prompt is set apart (its own span), the continuation follows it as plain text.
    assert '<span class="nbgpt-prompt"' in panel.output.value
    assert "to be</span>" + html.escape(expected) in panel.output.value
    assert "word-break: normal" in panel.output.value and "pre-wrap" in panel.output.value
    assert "tokens/s" in panel.status.value and "done:" in panel.status.value
    assert "temperature 0.00, top-k 50" in panel.status.value
    assert not panel.generate_button.disabled and panel.stop_button.disabled


def test_sliders_reach_the_generator(panel):
    panel.temperature.value = 1.35
    panel.top_k.value = 0
    panel.top_p.value = 0.9
    panel.seed.value = "42"
    panel.max_tokens.value = 5
    panel.generate_button.click()
    panel.wait(30)
    config = panel.last_config
    assert (config.temperature, config.top_k, config.top_p, config.seed, config.max_new_tokens) == (1.35, None, 0.9, 42, 5)


def generate(panel) -> tuple[str, int]:
    panel.generate_button.click()
    assert panel.wait(30)
    return panel.text, panel.last_config.seed


def test_each_generate_gets_a_fresh_seed_unless_one_is_fixed(panel):
    panel.max_tokens.value = 40
    panel.temperature.value = 1.5
    (first, seed_a), (second, seed_b) = generate(panel), generate(panel)
    assert seed_a != seed_b and first != second
    assert f"seed {seed_b}" in panel.status.value  # shown, so a sample can be repeated
    panel.seed.value = str(seed_a)
    assert generate(panel) == (first, seed_a)
    panel.seed.value = "lucky"
    panel.generate_button.click()
    assert not panel.running and "'lucky' is not a number" in panel.status.value


def test_static_copy_of_the_last_output_for_viewers_without_widgets(panel):
    panel.max_tokens.value = 20
    text, _ = generate(panel)
    bundle = panel._mimebundle()
    assert "application/vnd.jupyter.widget-view+json" in bundle  # JupyterLab shows the live panel
    assert bundle["text/plain"].endswith("to be" + text) and "PromptPanel(" not in bundle["text/plain"]
    assert html.escape(text) in bundle["text/html"] and "tokens/s" in bundle["text/html"]


class NeverEnds(GPT):
    """A model that never emits end-of-text, so only Stop (or max tokens) can end its generation."""

    def forward(self, idx, targets=None, cache=None, keep_logits=None):
        logits, loss = super().forward(idx, targets, cache, keep_logits)
        logits[..., -1] = float("-inf")
        return logits, loss


def test_stop_halts_a_long_generation():
    tok = CharTokenizer.from_text(TEXT)
    # Large enough that 2000 tokens take over a second on a CPU.
    model = NeverEnds(GPTConfig(vocab_size=tok.vocab_size, block_size=128, n_layer=4, n_head=4, n_embd=128))
    panel = prompt_panel(model, tok)
    panel.max_tokens.value = 2000
    panel.generate_button.click()
    deadline = time.monotonic() + 30
    while not panel.text and time.monotonic() < deadline:  # streaming has started
        time.sleep(0.001)
    assert panel.running
    panel.stop_button.click()
    assert panel.wait(10)
    assert "stopped:" in panel.status.value
    assert 0 < panel.generator.last_stats["tokens"] < 2000
