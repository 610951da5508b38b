"""Versioned route artifacts: what `frugal judge retrain` and `frugal cascade refit` promote, and what the
gateway swaps in without a restart (docs/learning.md).

One folder per route under `artifacts.dir`:

    <dir>/<route, "/" as "__">/
        v0001/route.yaml          the tiers: model, threshold, judge (a folder in this version, "packaged",
                                  or "none"); who made it, from what, and how it did against its parent
        v0001/judges/<model>/     a retrained judge (judge.onnx, judge.json)
        CURRENT                   the version in use ("config": the configuration file's own tiers)
        HISTORY                   one line per change: time, version, why

A version folder is written completely under a temporary name and renamed into place, and `CURRENT` is
replaced atomically, so a gateway that reads them never sees half an artifact.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

FORMAT = "frugal-route-artifact"
#: The version that means "the configuration file's own tiers" (no artifact).
CONFIG = "config"
_VERSION = re.compile(r"^v\d{4,}$")


class ArtifactError(ValueError):
    """An artifact cannot be read or used; the message says why."""


@dataclass(frozen=True)
class ArtifactTier:
    model: str
    threshold: float | None = None
    #: A judge folder (absolute once read), "packaged" (the local model's packaged judge) or "none".
    judge: str = "packaged"


@dataclass
class RouteArtifact:
    route: str
    version: str
    tiers: list[ArtifactTier]
    created_at: str = ""
    parent: str = CONFIG
    #: What made it and how it did (the promotion report).
    meta: dict[str, Any] = field(default_factory=dict)

    def to_yaml(self, folder: Path) -> dict[str, Any]:
        tiers = []
        for tier in self.tiers:
            judge = tier.judge
            if judge not in ("packaged", "none") and Path(judge).is_relative_to(folder):
                judge = str(Path(judge).relative_to(folder))
            tiers.append({"model": tier.model, "threshold": tier.threshold, "judge": judge})
        return {"format": FORMAT, "route": self.route, "version": self.version, "created_at": self.created_at,
                "parent": self.parent, "tiers": tiers, **self.meta}

    @classmethod
    def read(cls, folder: Path) -> RouteArtifact:
        path = folder / "route.yaml"
        try:
            doc = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ArtifactError(f"cannot read {path}: {exc}") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ArtifactError(f"{path} is not a frugal route artifact")
        tiers = []
        for entry in doc.get("tiers") or []:
            judge = str(entry.get("judge") or "packaged")
            if judge not in ("packaged", "none") and not Path(judge).is_absolute():
                judge = str(folder / judge)
            threshold = entry.get("threshold")
            tiers.append(ArtifactTier(str(entry["model"]), None if threshold is None else float(threshold), judge))
        if not tiers:
            raise ArtifactError(f"{path}: no tiers")
        known = {"format", "route", "version", "created_at", "parent", "tiers"}
        return cls(str(doc["route"]), str(doc["version"]), tiers, str(doc.get("created_at") or ""),
                   str(doc.get("parent") or CONFIG), {k: v for k, v in doc.items() if k not in known})


def route_folder_name(route: str) -> str:
    return route.replace("/", "__")


class ArtifactStore:
    """The versions of each route's artifacts under one folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, route: str) -> Path:
        return self.root / route_folder_name(route)

    def current(self, route: str) -> str:
        """The version in use: "config" when none was ever promoted."""
        try:
            value = (self.folder(route) / "CURRENT").read_text().strip()
        except FileNotFoundError:
            return CONFIG
        return value or CONFIG

    def versions(self, route: str) -> list[str]:
        folder = self.folder(route)
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if _VERSION.match(p.name) and (p / "route.yaml").is_file())

    def read(self, route: str, version: str) -> RouteArtifact:
        if not _VERSION.match(version):
            raise ArtifactError(f"{version!r} is not a version (v0001, v0002, …)")
        folder = self.folder(route) / version
        if not folder.is_dir():
            raise ArtifactError(f"route {route!r} has no version {version}")
        return RouteArtifact.read(folder)

    def history(self, route: str) -> list[dict[str, str]]:
        """Changes of the current version, oldest first: {at, version, why}."""
        try:
            lines = (self.folder(route) / "HISTORY").read_text().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            at, _, rest = line.partition("\t")
            version, _, why = rest.partition("\t")
            if version:
                out.append({"at": at, "version": version, "why": why})
        return out

    def previous(self, route: str) -> str | None:
        """The version that was current before the current one (what a rollback returns to)."""
        current = self.current(route)
        versions = [entry["version"] for entry in self.history(route)]
        while versions and versions[-1] == current:
            versions.pop()
        if versions:
            return versions[-1]
        return CONFIG if current != CONFIG else None

    def new_version(self, route: str, tiers: list[ArtifactTier], *, parent: str, meta: dict[str, Any],
                    judges: dict[str, Path] | None = None) -> RouteArtifact:
        """Write the next version (not yet current): its tiers, and the judge folders in `judges` (by model)
        copied in. Written under a temporary name, then renamed."""
        import shutil  # noqa: PLC0415

        folder = self.folder(route)
        folder.mkdir(parents=True, exist_ok=True)
        existing = self.versions(route)
        version = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=folder))
        final = folder / version
        placed = []
        for tier in tiers:
            source = (judges or {}).get(tier.model)
            if source is not None:
                target = staging / "judges" / route_folder_name(tier.model)
                shutil.copytree(source, target)
                tier = ArtifactTier(tier.model, tier.threshold, str(final / "judges" / route_folder_name(tier.model)))
            placed.append(tier)
        artifact = RouteArtifact(route, version, placed, datetime.now(UTC).isoformat(timespec="seconds"), parent, meta)
        (staging / "route.yaml").write_text(yaml.safe_dump(artifact.to_yaml(final), sort_keys=False, width=120))
        staging.rename(final)
        return artifact

    def set_current(self, route: str, version: str, why: str) -> None:
        """Make `version` current (atomically) and note it in HISTORY."""
        if version != CONFIG:
            self.read(route, version)  # it must exist and be readable
        folder = self.folder(route)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, prefix=".CURRENT-") as handle:
            handle.write(version + "\n")
        os.replace(handle.name, folder / "CURRENT")
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        with (folder / "HISTORY").open("a") as history:
            history.write(f"{stamp}\t{version}\t{' '.join(why.split())}\n")
