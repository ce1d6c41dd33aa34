"""Redaction of secrets in URLs before they are written to manifests, markers and logs.

Input URLs may carry credentials: a password in the userinfo (`http://alice:PASSWORD@host/x`)
or a signed-URL token in the query (S3 presigned `X-Amz-Signature`, GCS `X-Goog-Signature`,
Azure SAS `sig`, ...). Everything a run records about its inputs (`manifest.json`, `_stage.json`,
`_done/*.json`, `quarantine.jsonl`) goes through `redact` first, so the secret is replaced by
`***` and the rest of the URL (host, path, other query keys) stays readable.

A user name without a password (`ssh://alice@host/x`) is kept. The redacted URL is for records,
never for reading: the original stays in memory where the data is read.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

MASK = "***"

#: Query keys (compared case-insensitively) whose values are secrets in signed URLs.
SECRET_QUERY_KEYS = frozenset(
    k.lower()
    for k in (
        # AWS S3 presigned URLs (SigV4 and SigV2)
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "AWSAccessKeyId",
        "Signature",
        # GCS signed URLs
        "X-Goog-Signature",
        "X-Goog-Credential",
        "GoogleAccessId",
        # Azure SAS
        "sig",
        # generic bearer tokens and API keys
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "api_key",
        "apikey",
        "password",
        "secret",
        "client_secret",
    )
)

# A URL with a scheme inside any string: stops at whitespace, quotes and angle brackets so a
# URL quoted in an error message is redacted without eating the closing quote.
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")


def _redact_query(query: str) -> str:
    parts = query.split("&")
    for i, part in enumerate(parts):
        key, eq, _value = part.partition("=")
        if eq and unquote(key.replace("+", " ")).strip().lower() in SECRET_QUERY_KEYS:
            parts[i] = f"{key}={MASK}"
    return "&".join(parts)


def _redact_one(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    # authority: up to the first "/", "?" or "#" (a "@" in the password is kept in the userinfo)
    m = re.match(r"[^/?#]*", rest)
    authority = m.group(0) if m else ""
    tail = rest[len(authority) :]
    if "@" in authority:
        userinfo, _, hostport = authority.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        if colon:
            authority = f"{user}:{MASK}@{hostport}"
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hash_, frag = query.partition("#")
        tail = path + "?" + _redact_query(query) + hash_ + frag
    return scheme + sep + authority + tail


def redact_url(url: str) -> str:
    """`url` with its userinfo password and signed-URL query tokens replaced by `***`.

    Works on every `scheme://...` found in the string, so chained fsspec URLs
    (`simplecache::https://...`) and URLs quoted inside a message are redacted too; a string
    without a URL is returned unchanged.
    """
    if "://" not in url:
        return url
    return _URL_RE.sub(lambda m: _redact_one(m.group(0)), url)


def redact(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, tuples, strings, scalars) with every URL in every string
    redacted by `redact_url`; dict keys are kept as they are.
    """
    if isinstance(obj, str):
        return redact_url(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v) for v in obj)
    return obj
