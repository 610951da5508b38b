"""The client's say over caching: the request's `Cache-Control` header (RFC 9111 request directives)."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import bad_request


@dataclass(frozen=True, slots=True)
class CacheDirectives:
    #: May the answer come from the cache? (`no-cache`: no, ask the model, but the answer may be stored.)
    read: bool = True
    #: May the answer be stored? (`no-store`: neither read nor stored.)
    write: bool = True
    #: `max-age=N`: only a cached answer at most N seconds old will do.
    max_age_s: int | None = None


DEFAULT = CacheDirectives()


def parse_cache_control(header: str | None) -> CacheDirectives:
    """Directives from a `Cache-Control` value; unknown directives are ignored (as HTTP caches do), a
    malformed `max-age` is a 400."""
    if not header:
        return DEFAULT
    read, write, max_age = True, True, None
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        name = name.strip().lower()
        if name == "no-store":
            read = write = False
        elif name == "no-cache":
            read = False
        elif name == "max-age":
            value = value.strip().strip('"')
            if not value.isdigit():
                raise bad_request(f"Invalid Cache-Control header: max-age needs a whole number of seconds, "
                                  f"got {value!r}.", code="invalid_cache_control")
            max_age = int(value)
            if max_age == 0:
                read = False
    return CacheDirectives(read, write, max_age)
