"""Where the wire schemas live and which version each one is.

`schemas/` is the single source of truth: the version a message claims (in its
routing key, `dataschema` and headers) is read from the schema file itself.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

VERSION_KEY = "x-virtpub-version"

DOMAIN_EVENT = "domain-event"
PUBLISHER_CAPABILITIES = "publisher-capabilities"
PUBLISHER_SNAPSHOT = "publisher-snapshot"
PUBLISHER_BACKEND = "publisher-backend"
PUBLISHER_DROPPED = "publisher-dropped"
CONFIG_INVALID = "config-invalid"
ALL = (
    DOMAIN_EVENT,
    PUBLISHER_CAPABILITIES,
    PUBLISHER_SNAPSHOT,
    PUBLISHER_BACKEND,
    PUBLISHER_DROPPED,
    CONFIG_INVALID,
)


def schema_dir() -> Path:
    """A wheel carries the schemas inside the package; a source checkout has them at the top."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_schemas", package.parent / "schemas"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("virtpub's schemas/ directory is missing from this installation")


@dataclass(frozen=True, slots=True)
class SchemaInfo:
    name: str
    version: str
    path: Path

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])

    @property
    def uri(self) -> str:
        """The `dataschema` attribute: names the schema and its full version."""
        return f"urn:virtpub:schema:{self.name}:{self.version}"

    def load(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.path.read_text(encoding="utf-8")))


def latest_path(name: str) -> Path:
    candidates = sorted(
        (schema_dir() / name).glob("v*.json"), key=lambda p: int(p.stem.removeprefix("v"))
    )
    if not candidates:
        raise FileNotFoundError(f"no schema file for {name!r} in {schema_dir()}")
    return candidates[-1]


@functools.cache
def info(name: str) -> SchemaInfo:
    path = latest_path(name)
    document = json.loads(path.read_text(encoding="utf-8"))
    version = str(document[VERSION_KEY])
    if f"v{version.split('.', maxsplit=1)[0]}" != path.stem:
        raise ValueError(f"{path}: {VERSION_KEY} {version} does not match the file's major version")
    return SchemaInfo(name=name, version=version, path=path)


def fingerprint(document: dict[str, Any]) -> str:
    """Hash of a schema without its version: changes exactly when the contract does."""
    body = {k: v for k, v in document.items() if k != VERSION_KEY}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()
