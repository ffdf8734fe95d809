"""Keep secrets out of every message: errors, logs, events, CLI output (docs/THREAT_MODEL.md, "Secrets").

Backend libraries put whatever they like into exception text: gcsfs checks a raw token against
Google's tokeninfo endpoint and its error carries the token in the request URL, URL-encoded; a
client may echo a connection string it cannot parse. So every value a region's storage options
hold (credentials blocks included: they become storage options) is registered here when the
region is opened, and text leaving the package is scrubbed of it.

What counts as a secret: every string value in the options, at any depth; the values inside a
string that is itself JSON (a service-account key given as a string), the ``key=value`` parts
of a connection string (``AccountKey=...``), and each line of a multi-line value (a PEM key).
Each is masked raw, URL-encoded, JSON- or repr-escaped, and any run of ``WINDOW`` or more
characters of it is masked too, so a truncated or line-wrapped copy does not survive. Values
shorter than ``MIN_LENGTH`` are not masked (``anon``, a project id, a number): too short to be a
credential, and masking them would garble ordinary words.

Like GitHub Actions' ``add-mask``, registration is process-wide: a message about one store is
scrubbed of the secrets of every store opened in the process. Over-masking costs readability;
under-masking would cost a credential.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

MASK = "***"
MIN_LENGTH = 6
WINDOW = 10  # a run of this many characters of a secret is masked wherever it appears
_HEX_ESCAPE = re.compile(r"%[0-9A-F]{2}")


def secret_values(value: Any) -> set[str]:
    """Every string in ``value`` that is to be masked (see the module docstring)."""
    found: set[str] = set()

    def walk(item: Any, depth: int = 0) -> None:
        if depth > 20:
            return
        if hasattr(item, "get_secret_value"):  # pydantic SecretStr / SecretDict, Prefect's too
            walk(item.get_secret_value(), depth + 1)
        elif isinstance(item, Mapping):
            for child in item.values():
                walk(child, depth + 1)
        elif isinstance(item, (list, tuple, set, frozenset)):
            for child in item:
                walk(child, depth + 1)
        elif isinstance(item, bytes):
            walk(item.decode("utf-8", "replace"), depth + 1)
        elif isinstance(item, str):
            text = item.strip()
            if len(text) < MIN_LENGTH:
                return
            found.add(text)
            if text[:1] in "{[":
                try:
                    walk(json.loads(text), depth + 1)
                except ValueError:
                    pass
            if "\n" in text:
                for line in text.splitlines():
                    walk(line, depth + 1)
            if "=" in text and ";" in text:  # Azure-style connection string: Name=value;Name=value
                for part in text.split(";"):
                    walk(part.partition("=")[2], depth + 1)

    walk(value)
    return found


def _forms(secret: str) -> set[str]:
    """How a backend may print ``secret``: raw, URL-encoded (either hex case), JSON- or repr-escaped."""
    escaped = {secret, json.dumps(secret)[1:-1], repr(secret)[1:-1], secret.encode("unicode_escape").decode("ascii")}
    forms = set(escaped)
    for text in escaped:
        for encoded in (quote(text, safe=""), quote(text), quote_plus(text), quote_plus(text, safe="/")):
            forms.add(encoded)
            forms.add(_HEX_ESCAPE.sub(lambda m: m.group(0).lower(), encoded))
    return {form for form in forms if len(form) >= MIN_LENGTH}


class Redactor:
    """A set of secrets and ``scrub(text)``, which masks every trace of them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._whole: set[str] = set()  # forms shorter than WINDOW: masked when they appear whole
        self._windows: set[str] = set()  # every WINDOW-long run of every longer form
        self._seen: set[str] = set()

    def add(self, options: Any) -> None:
        """Register every secret in ``options`` (storage options, a credentials dict, a string)."""
        new = secret_values(options) - self._seen
        if not new:
            return
        whole, windows = set(), set()
        for secret in new:
            for form in _forms(secret):
                if len(form) < WINDOW:
                    whole.add(form)
                else:
                    windows.update(form[start : start + WINDOW] for start in range(len(form) - WINDOW + 1))
        with self._lock:
            self._seen |= new
            self._whole |= whole
            self._windows |= windows

    def __bool__(self) -> bool:
        return bool(self._seen)

    def scrub(self, text: str) -> str:
        """``text`` with every registered secret (whole, encoded or any long part of it) replaced by ``***``."""
        if not self._seen or not text:
            return text
        with self._lock:
            whole, windows = tuple(self._whole), self._windows
        covered = bytearray(len(text))
        if windows and len(text) >= WINDOW:
            for start in range(len(text) - WINDOW + 1):
                if text[start : start + WINDOW] in windows:
                    covered[start : start + WINDOW] = b"\x01" * WINDOW
        for form in whole:
            start = text.find(form)
            while start != -1:
                covered[start : start + len(form)] = b"\x01" * len(form)
                start = text.find(form, start + 1)
        if not any(covered):
            return text
        out, index = [], 0
        while index < len(text):
            if covered[index]:
                while index < len(text) and covered[index]:
                    index += 1
                out.append(MASK)
            else:
                out.append(text[index])
                index += 1
        return "".join(out)

    def scrub_obj(self, value: Any) -> Any:
        """``value`` (JSON-like: dicts, lists, strings) with every string scrubbed; keys too."""
        if not self._seen:
            return value
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, Mapping):
            return {self.scrub(k) if isinstance(k, str) else k: self.scrub_obj(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.scrub_obj(item) for item in value]
        return value


# The process-wide registry: regions register their storage options when opened.
REDACTOR = Redactor()


def register_secrets(options: Any) -> None:
    """Mask every secret in ``options`` in all text this package lets out, from now on."""
    REDACTOR.add(options)


def scrub(text: str) -> str:
    """``text`` without any registered secret (see ``Redactor.scrub``)."""
    return REDACTOR.scrub(text)


def scrub_obj(value: Any) -> Any:
    """A JSON-like ``value`` with every string in it scrubbed."""
    return REDACTOR.scrub_obj(value)


def scrub_all(texts: Iterable[str]) -> list[str]:
    return [scrub(text) for text in texts]
