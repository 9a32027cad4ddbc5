import hashlib

import pytest

from nbgpt.assets import cache_dir
from nbgpt.tokenizer import (GPT2_RANKS_SHA256, CharTokenizer, GPT2Tokenizer, Tokenizer, TokenizerError,
                             get_tokenizer, gpt2_ranks_bytes)


def test_gpt2_known_ids(gpt2_tokenizer):
    assert gpt2_tokenizer.vocab_size == 50257 and gpt2_tokenizer.eot == 50256
    # Ids from OpenAI's GPT-2 vocabulary.
    assert gpt2_tokenizer.encode("Hello world") == [15496, 995]
    text = "Shall I compare thee to a summer's day? Thou art more lovely — and café ☃."
    assert gpt2_tokenizer.decode(gpt2_tokenizer.encode(text)) == text
    # The special string in user text is plain text, never the EOT id.
    assert 50256 not in gpt2_tokenizer.encode("<|endoftext|>")


def test_both_satisfy_protocol(gpt2_tokenizer):
    char = CharTokenizer.from_text("hello")
    for tok in (gpt2_tokenizer, char):
        assert isinstance(tok, Tokenizer)
        assert tok.eot == tok.vocab_size - 1


def test_ranks_explicit_path_and_cache(tmp_path):
    cached = cache_dir() / "gpt2.tiktoken"
    gpt2_ranks_bytes()  # provisions the cache if needed
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == GPT2_RANKS_SHA256
    copy = tmp_path / "ranks.tiktoken"
    copy.write_bytes(cached.read_bytes())
    assert GPT2Tokenizer(copy).encode("Hello world") == [15496, 995]


def test_ranks_wrong_hash_and_missing_file(tmp_path, monkeypatch):
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"SGVsbG8= 0\n")
    with pytest.raises(TokenizerError, match="sha256.*NBGPT_GPT2_RANKS"):
        gpt2_ranks_bytes(bad)
    monkeypatch.setenv("NBGPT_GPT2_RANKS", str(tmp_path / "nope.tiktoken"))
    with pytest.raises(TokenizerError, match="does not exist"):
        gpt2_ranks_bytes()


@pytest.mark.registry
def test_ranks_provisioned_from_registry(tmp_path, monkeypatch):
    """An empty cache and no network: the ranks come from the openai-whisper sdist on the registry."""
    monkeypatch.setenv("NBGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("NBGPT_OFFLINE", "1")
    data = gpt2_ranks_bytes()
    assert hashlib.sha256(data).hexdigest() == GPT2_RANKS_SHA256
    assert (tmp_path / "cache" / "gpt2.tiktoken").read_bytes() == data


def test_ranks_unobtainable_error_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("NBGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    monkeypatch.setenv("PIP_INDEX_URL", "file:///nonexistent-index")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    with pytest.raises(TokenizerError, match="Fix: download .* NBGPT_GPT2_RANKS"):
        gpt2_ranks_bytes()


def test_char_roundtrip_save_load(tmp_path):
    tok = CharTokenizer.from_text("To be, or not to be")
    assert tok.vocab_size == len(set("To be, or not to be")) + 1
    ids = tok.encode("not to be")
    assert tok.decode(ids) == "not to be"
    assert tok.decode(ids + [tok.eot]) == "not to be"
    path = tok.save(tmp_path / "vocab.json")
    again = get_tokenizer("char", path)
    assert again.chars == tok.chars and again.identity() == tok.identity()


def test_char_unknown_character_named():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(TokenizerError, match=r"'z' \(U\+007A\) at position 2"):
        tok.encode("abz")


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(TokenizerError, match="unknown tokenizer"):
        get_tokenizer("sentencepiece")
    with pytest.raises(TokenizerError, match="needs the vocab.json"):
        get_tokenizer("char")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a char vocabulary"):
        CharTokenizer.load(tmp_path / "x.json")
    with pytest.raises(TokenizerError, match="empty text"):
        CharTokenizer.from_text("")
