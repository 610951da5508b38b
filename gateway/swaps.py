"""Hot swaps of cascade routes: a promoted artifact (retrained judge, refitted thresholds) replaces a route's
judges and thresholds without a restart, and a rollback puts the previous version back (docs/learning.md).

A swap builds the new route completely (judges loaded, thresholds checked) before one reference in the
router is replaced: a request that resolved the old route finishes on it, the next one gets the new one,
and no request ever sees both. A version that cannot be built is refused and nothing changes.

Two ways in: the admin API (`POST /admin/routes/swap`, `/admin/routes/rollback`), which also makes the
version current in the artifact store; and the store's `CURRENT` file, which every gateway watches
(`artifacts.watch_interval_s`), so a promotion or rollback made by the CLI or another replica is picked up.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

from gateway.artifacts import CONFIG, ArtifactError, ArtifactStore, RouteArtifact
from gateway.routes import RouteContext, build_cascade
from gateway.settings import ConfigError
from router.cascade import CascadeRoute
from router.route import Router

log = logging.getLogger("frugal.swaps")


class SwapError(ValueError):
    """The version cannot serve the route; nothing was swapped."""


@dataclass
class LiveRoute:
    """What serves a cascade route now, and what served it before (what a rollback returns to)."""

    version: str
    previous: str | None = None


class RouteSwitch:
    def __init__(self, context: RouteContext, router: Router, store: ArtifactStore) -> None:
        self.context = context
        self.router = router
        self.store = store
        self._lock = threading.Lock()  # one swap at a time (builds run in worker threads)
        self.live: dict[str, LiveRoute] = {r.name: LiveRoute(CONFIG) for r in context.config.routes
                                           if r.kind == "cascade"}
        #: A current version in the store that could not be built (not tried again until it changes).
        self._refused: dict[str, str] = {}

    def route(self, name: str) -> CascadeRoute:
        route = self.router.resolve(name)
        if name not in self.live or not isinstance(route, CascadeRoute):
            raise SwapError(f"{name!r} is not a cascade route")
        return route

    def _build(self, name: str, version: str) -> CascadeRoute:
        config = self.context.config.route(name)
        artifact: RouteArtifact | None = None
        try:
            if version != CONFIG:
                artifact = self.store.read(name, version)
                if artifact.route != name:
                    raise SwapError(f"version {version} in {self.store.folder(name)} is for route {artifact.route!r}")
            return build_cascade(config, self.context, artifact)
        except (ArtifactError, ConfigError) as exc:
            raise SwapError(str(exc)) from exc

    def swap(self, name: str, version: str, *, why: str = "admin API", persist: bool = True) -> dict[str, Any]:
        """Serve route `name` with `version` ("config" or v0001…); `persist` makes it current in the store
        (the other gateways follow). Raises `SwapError` (nothing changes)."""
        self.route(name)
        with self._lock:
            built = self._build(name, version)
            if persist:
                try:
                    self.store.set_current(name, version, why)
                except (ArtifactError, OSError) as exc:
                    raise SwapError(f"cannot make {version} current: {exc}") from exc
            live = self.live[name]
            if live.version != version:
                live.previous, live.version = live.version, version
            old = self.router.swap(name, built)
        log.warning("route %s: now served by %s (was %s; %s)", name, built.version,
                    getattr(old, "version", "?"), why)
        return self.describe(name)

    def rollback(self, name: str) -> dict[str, Any]:
        """Back to the version that served before the current one (this process's, else the store's)."""
        self.route(name)
        previous = self.live[name].previous or self.store.previous(name)
        if previous is None:
            raise SwapError(f"route {name!r} has no earlier version to roll back to")
        return self.swap(name, previous, why="rollback")

    def load_current(self) -> None:
        """At start-up: each route served by its current version in the store (the configuration's own tiers
        when none was promoted). A current version that cannot be built is logged and the configuration
        serves: a broken artifact must not keep the gateway from starting."""
        for name in self.live:
            version = self.store.current(name)
            if version == CONFIG:
                continue
            try:
                self.swap(name, version, why="start-up", persist=False)
            except SwapError as exc:
                log.error("route %s: current artifact %s cannot be used (%s); serving the configuration", name,
                          version, exc)

    def poll(self) -> list[str]:
        """Follow the store: swap each route whose current version changed (by the CLI, another replica).
        Returns the routes swapped."""
        swapped = []
        for name, live in self.live.items():
            version = self.store.current(name)
            if version in (live.version, self._refused.get(name)):
                continue
            try:
                self.swap(name, version, why="artifact store changed", persist=False)
                swapped.append(name)
            except SwapError as exc:
                self._refused[name] = version  # said once, not at every look
                log.error("route %s: current artifact %s cannot be used (%s); still serving %s", name, version,
                          exc, live.version)
        return swapped

    def describe(self, name: str) -> dict[str, Any]:
        """The live cascade: tiers, thresholds, judges, the version and what a rollback would return to."""
        route = self.route(name)
        live = self.live[name]
        config = self.context.config.route(name)
        return {
            "route": name,
            "version": route.version,
            "artifact": live.version,
            "previous": live.previous or self.store.previous(name),
            "versions": self.store.versions(name),
            "tiers": [{"model": t.model, "threshold": t.threshold,
                       "judge": getattr(route.judges.get(t.model), "version", None)} for t in route.tiers],
            "on_unaccepted": route.on_unaccepted,
            "learning": config.learning.model_dump(),
        }
