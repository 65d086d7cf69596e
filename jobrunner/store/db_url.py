"""Database URLs as they may be shown to people: passwords and secret query parameters masked.

Every place that prints, logs or writes a store URL (dashboard header, `--json`, error messages)
goes through `mask_url`, so `postgresql://app:hunter2@db/jobs` never reaches a terminal, a CI log
or a screenshot as anything but `postgresql://app:***@db/jobs`.
"""
from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode

MASK = "***"
# Query parameters that carry a secret in libpq / SQLAlchemy URLs (matched case-insensitively).
SECRET_PARAMS = ("password", "sslpassword", "passfile", "token", "secret", "api_key", "apikey", "key")

# scheme://user:password@host... (also used when the URL does not parse)
_USERINFO = re.compile(r"^(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@?#]*):(?P<secret>[^@/?#]*)@")


def mask_url(url: str | None) -> str:
    """The URL with its password and secret query parameters replaced by ***.

    A bare file path (a SQLite store) is returned unchanged; so is a URL without secrets.
    """
    if not url:
        return ""
    text = str(url)
    if "://" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@" if m.group("secret") else m.group(0), text)
    base, sep, query = text.partition("?")
    if not sep:
        return text
    pairs = parse_qsl(query, keep_blank_values=True)
    if not any(_is_secret(name) for name, _ in pairs):
        return text
    masked = [(name, MASK if _is_secret(name) else value) for name, value in pairs]
    return f"{base}?{urlencode(masked, safe='*/:,=-')}"


def _is_secret(name: str) -> bool:
    return name.lower() in SECRET_PARAMS
