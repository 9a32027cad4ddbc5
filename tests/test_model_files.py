"""The one model loader: HF folders, hub names through the Hugging Face cache, and the offline message,
exercised through `python -m nbgpt sample` as a user runs it."""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from nbgpt.generate import Generator, SamplingConfig
from nbgpt.model_files import HFFormatError, load_hf, load_model
from nbgpt.widgets import prompt_panel

transformers = pytest.importorskip("transformers")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_gpt2_folder(folder, vocab_size=50257):
    """A small random GPT2LMHeadModel with GPT-2's vocabulary, saved by transformers."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(folder)
    return model


def sample(checkpoint, hub_cache, prompt="Hello"):
    cmd = [sys.executable, "-m", "nbgpt", "sample", "--checkpoint", str(checkpoint), "--prompt", prompt,
           "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_sample_from_hf_folder_and_from_hf_cache(tmp_path, gpt2_tokenizer):
    reference = tiny_gpt2_folder(tmp_path / "hf")
    prompt_ids = gpt2_tokenizer.encode("Hello")
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False,
                                 pad_token_id=gpt2_tokenizer.eot)
    expected = "Hello" + gpt2_tokenizer.decode(out[0, len(prompt_ids):].tolist()) + "\n"  # prompt, continuation

    from_folder = sample(tmp_path / "hf", tmp_path / "empty-cache")
    assert from_folder.returncode == 0, from_folder.stderr[-2000:]
    assert from_folder.stdout == expected
    assert "nbgpt sample: decoding on cpu in fp32 (precision=fp32)" in from_folder.stderr

    # The same weights as the hub's "gpt2" in the Hugging Face cache (its documented layout): offline, the
    # hub name resolves to the cached snapshot.
    snapshot = tmp_path / "hub" / "models--gpt2" / "snapshots" / COMMIT
    snapshot.parent.mkdir(parents=True)
    (tmp_path / "hub" / "models--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--gpt2" / "refs" / "main").write_text(COMMIT)
    (tmp_path / "hf").rename(snapshot)
    from_cache = sample("gpt2", tmp_path / "hub")
    assert from_cache.returncode == 0, from_cache.stderr[-2000:]
    assert from_cache.stdout == expected


def test_hub_name_offline_without_a_cached_copy_says_so(tmp_path):
    result = sample("gpt2", tmp_path / "empty-cache")
    assert result.returncode != 0
    assert ("'gpt2' is no local path, and as a hub model name it is not in the Hugging Face cache and "
            "NBGPT_OFFLINE/HF_HUB_OFFLINE is set") in result.stderr
    assert "hf download gpt2" in result.stderr


def test_hf_folder_with_another_vocabulary_is_refused(tmp_path):
    tiny_gpt2_folder(tmp_path / "hf", vocab_size=300)
    with pytest.raises(HFFormatError, match="vocab_size 300, fewer than GPT-2 BPE's 50257"):
        load_model(tmp_path / "hf")


def test_loaded_hf_folder_describes_itself(tmp_path):
    tiny_gpt2_folder(tmp_path / "hf")
    loaded = load_model(tmp_path / "hf")
    assert loaded.step is None and loaded.tokenizer.name == "gpt2" and not loaded.model.training
    assert loaded.describe() == f"GPT-2-format weights from {tmp_path / 'hf'}"


def test_prompt_panel_loads_a_model_source(tmp_path, gpt2_tokenizer):
    tiny_gpt2_folder(tmp_path / "hf")
    panel = prompt_panel(str(tmp_path / "hf"), prompt="Hello", precision="fp32")
    panel.max_tokens.value, panel.temperature.value = 6, 0.0
    panel.generate_button.click()
    assert panel.wait(60)
    expected = Generator(load_hf(tmp_path / "hf"), gpt2_tokenizer).complete(
        "Hello", SamplingConfig(max_new_tokens=6, temperature=0.0))
    assert panel.text == expected and "done:" in panel.status.value


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    with pytest.raises(HFFormatError, match=r"runs/mnie does not exist \(in .*runs: mine\), so it is not a directory"):
        load_model(tmp_path / "runs" / "mnie")
    relative = subprocess.run([sys.executable, "-m", "nbgpt", "sample", "--checkpoint", "runs/mnie"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    assert relative.returncode == 2 and "hf download" not in relative.stderr
    assert relative.stderr.strip().count("\n") == 0 and "runs/mnie does not exist" in relative.stderr


def test_nbgpt_format_round_trip_of_a_speedrun_model(tmp_path, gpt2_tokenizer):
    """What HF's GPT-2 cannot express goes to nbgpt's own format; load_model reads it back exactly."""
    from nbgpt.model_files import NBGPT_FILE, export_model
    from nbgpt.model import GPT, GPTConfig

    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, block_size=32, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64,
                       position="rope", activation="relu2", qk_norm=True, zero_init_proj=True,
                       tie_embeddings=False, logit_softcap=30.0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out, written, why, _ = export_model(model, gpt2_tokenizer, tmp_path / "export")
    assert why == "HF's GPT-2 cannot carry position='rope', qk_norm=True, logit_softcap=30"
    assert written == "nbgpt" and sorted(p.name for p in out.iterdir()) == ["model.safetensors", NBGPT_FILE]
    loaded = load_model(out)
    assert loaded.model.config == config and loaded.tokenizer.identity() == gpt2_tokenizer.identity()
    assert loaded.describe() == f"nbgpt-format weights from {out}"
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(idx)[0], model(idx)[0], atol=0, rtol=0)
    result = sample(out, tmp_path / "cache")  # `nbgpt sample` reads it too
    expected = Generator(model, gpt2_tokenizer).complete("Hello", SamplingConfig(max_new_tokens=8, temperature=0.0))
    assert result.returncode == 0 and result.stdout == "Hello" + expected + "\n", result.stderr[-2000:]


def test_cli_export_picks_hf_for_gpt2_and_nbgpt_for_the_rest(tmp_path):
    tiny_gpt2_folder(tmp_path / "hf")
    hf = subprocess.run([sys.executable, "-m", "nbgpt", "export", "--checkpoint", str(tmp_path / "hf"), "--out",
                         str(tmp_path / "again")], capture_output=True, text=True, timeout=300)
    assert hf.returncode == 0 and '"format": "hf"' in hf.stdout, hf.stderr[-2000:]
    assert (tmp_path / "again" / "config.json").is_file()
    own = subprocess.run([sys.executable, "-m", "nbgpt", "export", "--checkpoint", str(tmp_path / "hf"), "--out",
                          str(tmp_path / "own"), "--format", "nbgpt"], capture_output=True, text=True, timeout=300)
    assert own.returncode == 0 and '"format": "nbgpt"' in own.stdout
    with torch.no_grad():
        idx = torch.randint(0, 50257, (1, 16))
        torch.testing.assert_close(load_model(tmp_path / "own").model(idx)[0], load_model(tmp_path / "hf").model(idx)[0])
    # Files others are meant to load get the permissions of any new file, not mkstemp's private 0600.
    umask = os.umask(0o022)
    os.umask(umask)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "own").iterdir()} == \
        {"model.safetensors": 0o666 & ~umask, "nbgpt_model.json": 0o666 & ~umask}


def test_export_never_overwrites_or_mixes_with_an_exported_model(tmp_path):
    """A second export into a folder that holds one is refused in one line, and the first is left as it was."""
    tiny_gpt2_folder(tmp_path / "hf")
    export = [sys.executable, "-m", "nbgpt", "export", "--checkpoint", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]
    assert subprocess.run(export + ["--format", "nbgpt"], capture_output=True, text=True, timeout=300).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    for fmt in ("hf", "nbgpt"):
        again = subprocess.run(export + ["--format", fmt], capture_output=True, text=True, timeout=300)
        assert again.returncode == 2 and again.stderr.strip().count("\n") == 0, again.stderr[-2000:]
        assert "already holds model.safetensors, nbgpt_model.json; export into a new or empty folder" in again.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before


def test_a_char_model_is_not_exported_as_hf_gpt2(tmp_path):
    """HF folders are read as GPT-2 BPE models: a char model's ids would load and decode to nonsense."""
    from nbgpt.knobs import ConfigError
    from nbgpt.model_files import export_model
    from nbgpt.model import GPT, GPTConfig
    from nbgpt.tokenizer import CharTokenizer

    char = CharTokenizer.from_text("to be or not to be")
    model = GPT(GPTConfig(vocab_size=char.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    with pytest.raises(ConfigError, match="cannot carry tokenizer 'char' .*export with --format nbgpt"):
        export_model(model, char, tmp_path / "hf", "hf")
    out, written, why, tokenizer = export_model(model, char, tmp_path / "auto")
    assert (written, why) == ("nbgpt", "HF's GPT-2 cannot carry tokenizer 'char' (HF GPT-2 means GPT-2's BPE)")
    assert tokenizer == ("the character vocabulary, in nbgpt_model.json (nbgpt's loaders rebuild it); no HF "
                         "tokenizer files: transformers has no tokenizer for nbgpt's character vocabulary")
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "nbgpt_model.json"]
    assert load_model(out).tokenizer.identity() == char.identity()


def save_char_checkpoint(checkpoints, step, seed):
    from nbgpt.checkpoint import save_checkpoint
    from nbgpt.model import GPT, GPTConfig
    from nbgpt.tokenizer import CharTokenizer, tokenizer_spec

    tokenizer = CharTokenizer.from_text("to be or not to be\n")
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_checkpoint(checkpoints, step, {"model": model.state_dict(), "model_config": model.config.to_dict(),
                                        "tokenizer": tokenizer_spec(tokenizer)})


def test_export_stays_out_of_run_directories_and_their_checkpoints_win(tmp_path):
    """`nbgpt export --out runs/ddp` once put an export where the run's loaders looked, and every later load of
    runs/ddp (sample, notebooks 04/05) read that stale export instead of the newer checkpoints."""
    run = tmp_path / "runs" / "ddp"
    save_char_checkpoint(run / "checkpoints", 10, seed=0)
    (tmp_path / "README.md").write_text("a file")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")

    def export(out):
        return subprocess.run([sys.executable, "-m", "nbgpt", "export", "--checkpoint", "runs/ddp", "--out", out],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    refusals = {out: export(out) for out in ("runs/ddp", "runs/ddp/export", "runs/ddp/checkpoints", "README.md",
                                              "notes")}
    assert {out: (r.returncode, r.stderr) for out, r in refusals.items()} == {
        "runs/ddp": (2, "nbgpt: ConfigError: runs/ddp is the run directory runs/ddp, whose checkpoints its loaders "
                        "read; export into a folder of its own, e.g. runs/ddp-export\n"),
        "runs/ddp/export": (2, f"nbgpt: ConfigError: runs/ddp/export is inside the run directory {run}, whose "
                               f"checkpoints its loaders read; export into a folder of its own, e.g. {run}-export\n"),
        "runs/ddp/checkpoints": (2, "nbgpt: ConfigError: runs/ddp/checkpoints is the run directory "
                                    "runs/ddp/checkpoints, whose checkpoints its loaders read; export into a folder "
                                    "of its own, e.g. runs/ddp/checkpoints-export\n"),
        "README.md": (2, "nbgpt: ConfigError: README.md is a file, not a folder; export into a new folder, e.g. "
                         "export\n"),
        "notes": (2, "nbgpt: ConfigError: notes already holds todo.txt; export into a new or empty folder, e.g. "
                     "notes-export\n")}
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints"] and (tmp_path / "README.md").read_text() == "a file"

    # A run directory that holds an export anyway (an older nbgpt wrote it there) loads its newest checkpoint.
    assert export("runs/ddp-export").returncode == 0
    for exported in (tmp_path / "runs" / "ddp-export").iterdir():
        exported.rename(run / exported.name)
    save_char_checkpoint(run / "checkpoints", 20, seed=1)
    assert load_model(run).step == 20
    sampled = subprocess.run([sys.executable, "-m", "nbgpt", "sample", "--checkpoint", str(run), "--prompt", "to",
                              "--max-new-tokens", "2"], capture_output=True, text=True, timeout=300)
    assert sampled.returncode == 0 and sampled.stderr.startswith(
        f"{run} holds checkpoints and an exported model (model.safetensors, nbgpt_model.json): loaded its newest "
        f"checkpoint, step 20, not the export; move the export to a folder of its own\n"), sampled.stderr


def test_hf_export_carries_gpt2s_tokenizer_for_autotokenizer_and_pipeline(tmp_path, gpt2_tokenizer, monkeypatch):
    """vocab.json + merges.txt written from the ranks nbgpt verifies: transformers' tokenizer gives nbgpt's ids."""
    tiny_gpt2_folder(tmp_path / "hf")
    exported = subprocess.run([sys.executable, "-m", "nbgpt", "export", "--checkpoint", str(tmp_path / "hf"), "--out",
                               str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads(exported.stdout)["tokenizer"] == (
        "GPT-2's BPE in vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json: transformers' "
        "AutoTokenizer and pipeline('text-generation') load the folder")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert len(theirs) == 50257 and theirs.eos_token_id == gpt2_tokenizer.eot
    text = ("Hello, world! It's 2026: naïve café, Ελληνικά, 日本語 and emoji 🙂🚀.\n\n\tTabs\t\tand   runs of    "
            "spaces, numbers 3.14159 and 1,234,567; they'll've 'quoted' CAPS-LOCK\r\nend   ")
    assert theirs(text)["input_ids"] == gpt2_tokenizer.encode(text)
    assert theirs.decode(gpt2_tokenizer.encode(text)) == text
    generate = transformers.pipeline("text-generation", model=str(tmp_path / "export"))
    out = generate("Hello", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    ours = Generator(load_model(tmp_path / "export").model, gpt2_tokenizer).complete(
        "Hello", SamplingConfig(max_new_tokens=5, temperature=0.0, stop_at_eot=False))
    assert out == "Hello" + ours
