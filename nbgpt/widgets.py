"""An ipywidgets panel for prompting a model: sliders for the sampling knobs, streaming output, Stop.

Generation runs in a background thread, so the kernel keeps handling widget messages (the Stop button, the
sliders) while tokens stream into the output area.
"""

from __future__ import annotations

import html
import os
import threading
import time

import ipywidgets as widgets
import torch

from .generate import Generator, SamplingConfig, load_generator
from .tokenizer import Tokenizer

OUTPUT_STYLE = ("font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px; white-space: pre-wrap; "
                "border: 1px solid #d0d7de; border-radius: 6px; padding: 8px; min-height: 120px; "
                "max-height: 420px; overflow-y: auto; background: #f6f8fa; margin: 0")


def _generator(model: torch.nn.Module | Generator | str | os.PathLike, tokenizer: Tokenizer | None,
               precision: str) -> Generator:
    if isinstance(model, Generator):
        return model
    if isinstance(model, (str, os.PathLike)):  # a run, checkpoint, HF folder or hub name: the one loader
        return load_generator(str(model), precision=precision)
    return Generator(model, tokenizer, precision=precision)


class PromptPanel(widgets.VBox):
    """Prompt text area, sampling sliders, Generate/Stop, streamed output and tokens/s."""

    refresh_seconds = 0.05

    def __init__(self, model: torch.nn.Module | Generator | str, tokenizer: Tokenizer | None = None, prompt: str = "",
                 precision: str = "auto", max_tokens: int = 200):
        self.generator = _generator(model, tokenizer, precision)
        label = {"description_width": "150px"}
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
        self.seed = widgets.IntText(value=0, description="Seed", style=label)
        self.generate_button = widgets.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = widgets.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.status = widgets.HTML(value="<i class='nbgpt-status'>ready</i>")
        self.output = widgets.HTML(value=self._render(""))
        self.generate_button.on_click(lambda _: self.start())
        self.stop_button.on_click(lambda _: self.stop())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_config: SamplingConfig | None = None
        self.text = ""
        super().__init__([
            widgets.HTML("<b>nbgpt prompt panel</b>"), self.prompt,
            self.temperature, self.top_k, self.top_p, self.max_tokens, self.seed,
            widgets.HBox([self.generate_button, self.stop_button, self.status]), self.output,
        ], layout=widgets.Layout(width="100%", max_width="900px"))

    def sampling_config(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_tokens.value, temperature=self.temperature.value,
                              top_k=self.top_k.value or None, top_p=self.top_p.value, seed=self.seed.value)

    @staticmethod
    def _render(text: str) -> str:
        return f'<pre class="nbgpt-output" style="{OUTPUT_STYLE}">{html.escape(text)}</pre>'

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self.last_config = self.sampling_config()
        self.text = ""
        self.output.value = self._render(self.prompt.value)
        self.generate_button.disabled, self.stop_button.disabled = True, False
        self.status.value = "<i class='nbgpt-status'>generating…</i>"
        self._thread = threading.Thread(target=self._run, args=(self.prompt.value, self.last_config), daemon=True)
        self._thread.start()

    def _run(self, prompt: str, config: SamplingConfig) -> None:
        shown_at = 0.0
        try:
            for piece in self.generator.stream(prompt, config, should_stop=self._stop.is_set):
                self.text += piece
                # Each update resends the whole text to the browser: ~20 per second keeps it fluid and in step.
                if time.monotonic() - shown_at >= self.refresh_seconds:
                    self.output.value = self._render(prompt + self.text)
                    shown_at = time.monotonic()
            self.output.value = self._render(prompt + self.text)
            stats = self.generator.last_stats
            ended = "stopped" if self._stop.is_set() else "done"
            self.status.value = (f"<span class='nbgpt-status'>{ended}: {stats['tokens']} tokens in "
                                 f"{stats['seconds']:.2f} s (<b>{stats['tokens_per_s']:.1f} tokens/s</b>) · "
                                 f"temperature {config.temperature:.2f}, top-k {config.top_k or 'off'}, "
                                 f"top-p {config.top_p:.2f}, seed {config.seed}</span>")
        except Exception as exc:  # show the reason in the panel; the kernel stays usable
            self.status.value = f"<span style='color:#b00'>error: {html.escape(str(exc))}</span>"
        finally:
            self.generate_button.disabled, self.stop_button.disabled = False, True

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
    nbgpt.loading.load_model accepts (a run directory, "gpt2", ...); display it as a cell's last expression."""
    return PromptPanel(model, tokenizer, **kwargs)
