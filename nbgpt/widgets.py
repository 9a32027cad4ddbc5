"""An ipywidgets panel for prompting a model: sliders for the sampling knobs, streaming output, Stop.

Generation runs in a background thread, so the kernel keeps handling widget messages (the Stop button, the
sliders) while tokens stream into the output area.
"""

from __future__ import annotations

import html
import os
import secrets
import threading
import time

import ipywidgets as widgets
import torch

from .knobs import ConfigError
from .generate import Generator, SamplingConfig, load_generator
from .tokenizer import Tokenizer

# pre-wrap keeps the model's own line breaks and wraps long lines at spaces; word-break is set explicitly so
# that no surrounding stylesheet breaks inside words, and overflow-wrap breaks a word only when it alone is
# wider than the box.
OUTPUT_STYLE = ("font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; line-height: 1.45; "
                "white-space: pre-wrap; word-break: normal; overflow-wrap: break-word; "
                "border: 1px solid #d0d7de; border-radius: 6px; padding: 8px; min-height: 120px; "
                "max-height: 420px; overflow-y: auto; background: #f6f8fa; color: #1f2328; margin: 0; "
                "box-sizing: border-box; width: 100%")
PROMPT_STYLE = "font-weight: 600; color: #0550ae; background: #ddf4ff; border-radius: 3px"


def _generator(model: torch.nn.Module | Generator | str | os.PathLike, tokenizer: Tokenizer | None,
               precision: str) -> Generator:
    if isinstance(model, Generator):
        return model
    if isinstance(model, (str, os.PathLike)):  # a run, checkpoint, HF folder or hub name: the one loader
        return load_generator(str(model), precision=precision)
    return Generator(model, tokenizer, precision=precision)


class PromptPanel(widgets.VBox):
    """Prompt text area, sampling sliders, a seed box, Generate/Stop, streamed output and tokens/s.

    Where widgets cannot render (a saved notebook on GitHub, nbconvert) the panel's output cell holds a
    static copy of its last generation instead, refreshed after each one.
    """

    refresh_seconds = 0.05

    def __init__(self, model: torch.nn.Module | Generator | str, tokenizer: Tokenizer | None = None, prompt: str = "",
                 precision: str = "auto", max_tokens: int = 200):
        self.generator = _generator(model, tokenizer, precision)
        label = {"description_width": "120px"}
        wide = widgets.Layout(width="100%")
        self.prompt = widgets.Textarea(value=prompt, placeholder="Type a prompt (empty: start from scratch)",
                                       description="Prompt", style=label, layout=widgets.Layout(width="100%",
                                                                                                height="80px"))
        self.temperature = widgets.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.05, description="Temperature",
                                               style=label, layout=wide, readout_format=".2f")
        self.top_k = widgets.IntSlider(value=50, min=0, max=500, step=1, description="Top-k (0 = off)",
                                       style=label, layout=wide)
        self.top_p = widgets.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="Top-p (mass)",
                                         style=label, layout=wide, readout_format=".2f")
        self.max_tokens = widgets.IntSlider(value=max_tokens, min=1, max=2000, step=1,
                                            description="Max new tokens", style=label, layout=wide)
        # "random" draws a fresh seed for every Generate (shown in the status line); a number repeats a sample.
        self.seed = widgets.Text(value="random", description="Seed", placeholder="random, or a number to repeat",
                                 style=label, layout=widgets.Layout(width="320px"))
        button = widgets.Layout(width="120px", flex="0 0 auto")  # never squeezed by its neighbours
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play",
                                              layout=button)
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True,
                                          layout=button)
        self.status = widgets.HTML(value="<span class='nbgpt-status'><i>ready</i></span>", layout=wide)
        self.output = widgets.HTML(value=self._render("", ""), layout=wide)
        self.generate_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._display = None  # the handle of the cell output holding the static copy
        self.last_config: SamplingConfig | None = None
        self.last_prompt, self.text = prompt, ""
        super().__init__([
            widgets.HTML("<b>nbgpt prompt panel</b>"), self.prompt,
            self.temperature, self.top_k, self.top_p, self.max_tokens, self.seed,
            widgets.HBox([self.generate_button, self.stop_button], layout=widgets.Layout(margin="4px 0 0 124px")),
            self.status, self.output,
        ], layout=widgets.Layout(width="100%", max_width="900px", padding="0 6px 0 0"))  # room for the margins

    def sampling_config(self) -> SamplingConfig:
        """The sliders' values; a seed box reading "random" (or empty) gets a fresh seed each time."""
        text = self.seed.value.strip().lower()
        if text in ("", "random"):
            seed = secrets.randbelow(2**31)
        elif text.isdigit():
            seed = int(text)
        else:
            raise ConfigError(f"seed {self.seed.value!r} is not a number: type a whole number, or 'random'")
        return SamplingConfig(max_new_tokens=self.max_tokens.value, temperature=self.temperature.value,
                              top_k=self.top_k.value or None, top_p=self.top_p.value, seed=seed)

    @staticmethod
    def _render(prompt: str, continuation: str) -> str:
        """The prompt highlighted, the model's continuation plain after it, in one wrapping block."""
        shown = f'<span class="nbgpt-prompt" style="{PROMPT_STYLE}">{html.escape(prompt)}</span>' if prompt else ""
        return f'<pre class="nbgpt-output" style="{OUTPUT_STYLE}">{shown}{html.escape(continuation)}</pre>'

    # ------------------------------------------------------------------------- the copy for static viewers

    def _ipython_display_(self) -> None:
        from IPython.display import display

        self._display = display(self._mimebundle(), raw=True, display_id=True)

    def _mimebundle(self) -> dict:
        """The widget, plus text/html and text/plain copies of the last generation for static viewers."""
        return {**self._repr_mimebundle_(),
                "text/html": f"<b>nbgpt prompt panel</b> (a static copy)<br>{self.output.value}{self.status.value}",
                "text/plain": f"nbgpt prompt panel, last output:\n{self.last_prompt}{self.text}"}

    def start(self) -> None:
        if self.running:
            return
        try:
            config = self.sampling_config()
        except ValueError as exc:
            self._show_status(f"<span style='color:#b00'>{html.escape(str(exc), quote=False)}</span>")
            return
        self._stop.clear()
        self.last_config, self.last_prompt, self.text = config, self.prompt.value, ""
        self.output.value = self._render(self.last_prompt, "")
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self._show_status(f"<i>generating… (seed {config.seed})</i>")
        self._thread = threading.Thread(target=self._run, args=(self.last_prompt, config), daemon=True)
        self._thread.start()

    def _show_status(self, inner_html: str) -> None:
        self.status.value = f"<span class='nbgpt-status'>{inner_html}</span>"

    def _run(self, prompt: str, config: SamplingConfig) -> None:
        shown_at = 0.0
        try:
            for piece in self.generator.stream(prompt, config, should_stop=self._stop.is_set):
                self.text += piece
                # Each update resends the whole text to the browser: ~20 per second keeps it fluid and in step.
                if time.monotonic() - shown_at >= self.refresh_seconds:
                    self.output.value = self._render(prompt, self.text)
                    shown_at = time.monotonic()
            self.output.value = self._render(prompt, self.text)
            stats = self.generator.last_stats
            ended = "stopped" if self._stop.is_set() else "done"
            self._show_status(f"{ended}: {stats['tokens']} tokens in {stats['seconds']:.2f} s "
                              f"(<b>{stats['tokens_per_s']:.1f} tokens/s</b>) · temperature {config.temperature:.2f}, "
                              f"top-k {config.top_k or 'off'}, top-p {config.top_p:.2f}, seed {config.seed}")
        except Exception as exc:  # show the reason in the panel; the kernel stays usable
            self._show_status(f"<span style='color:#b00'>error: {html.escape(str(exc), quote=False)}</span>")
        finally:
            self.generate_button.disabled, self.stop_button.disabled = False, True
            if self._display is not None:  # keep the static copy in step with what the widget shows
                self._display.update(self._mimebundle(), raw=True)

    def stop(self) -> None:
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current generation ends (for scripts and tests); True if it ended."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running


def prompt_panel(model: torch.nn.Module | Generator | str, tokenizer: Tokenizer | None = None, **kwargs) -> PromptPanel:
    """The interactive sampling panel for a model (with its tokenizer), an existing Generator, or anything
    nbgpt.model_files.load_model accepts (a run directory, "gpt2", ...); show it with `display(panel)` or as a
    cell's last expression."""
    return PromptPanel(model, tokenizer, **kwargs)
