"""Domain config files, read as untrusted input: which names to watch, and what a file says.

On hosts whose hypervisor reports no define/undefine, the config files are the
only record of which domains exist. Anyone who can write to the directory
controls these bytes, so nothing here raises on bad input: every file ends as
a `ParsedConfig` or a `Rejection` with a short reason code, and only the two
facts virtpub needs (name and UUID) are taken from it. No I/O happens here.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeGuard
from xml.etree.ElementTree import ParseError

import defusedxml.ElementTree
from defusedxml import DefusedXmlException

Format = Literal["libvirt-xml", "xl"]
SUFFIXES: dict[Format, str] = {"libvirt-xml": ".xml", "xl": ".cfg"}
"""The file name suffix each format is saved under; everything else in the directory is ignored."""

MAX_BYTES = 1 << 20
"""Larger than any real domain config by far; a bigger file is refused unread."""
MAX_NAME_CHARS = 1024

Reason = Literal[
    "too_large",
    "binary",
    "malformed",
    "forbidden_xml",
    "not_a_domain",
    "missing_name",
    "bad_name",
    "bad_uuid",
    "symlink",
    "not_regular",
    "unreadable",
]
"""Why a file was refused: the vocabulary of `config.invalid`. The last three are found
by the reader before any parsing."""


@dataclass(frozen=True, slots=True)
class ParsedConfig:
    """`uuid` is canonical lowercase, or None when the file gives none (xl may leave it to Xen):
    the name is then the domain's only stable identity."""

    name: str
    uuid: str | None


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    message: str
    """One line for the operator; never quotes the file's content."""


def is_format(name: str) -> TypeGuard[Format]:
    return name in SUFFIXES


def watched(fmt: Format, filename: str) -> bool:
    """Whether a directory entry can be a config of this format.

    Editors and tools save next to the file: vim's `.name.swp`/`.swx`, `name~`
    and `4913`, emacs's `#name#` and `.#name`, and `.name.tmp` or `name.new`
    before a rename. All of them are hidden, start with '#', or lack the suffix.
    A name that is not valid UTF-8 could not be published, and no tool writes one.
    """
    suffix = SUFFIXES[fmt]
    if len(filename) <= len(suffix) or not filename.endswith(suffix):
        return False
    if filename.startswith((".", "#")):
        return False
    try:
        filename.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse(fmt: Format, data: bytes) -> ParsedConfig | Rejection:
    if len(data) > MAX_BYTES:
        return Rejection("too_large", f"larger than {MAX_BYTES} bytes")
    if b"\0" in data:
        return Rejection("binary", "contains NUL bytes")
    try:
        # libvirt writes UTF-8; decoding here also keeps expat from honouring whatever
        # encoding a hostile XML declaration names.
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        return Rejection("binary", f"not UTF-8 text (byte {err.start})")
    return _PARSERS[fmt](text)


def _parse_xml(text: str) -> ParsedConfig | Rejection:
    try:
        root = defusedxml.ElementTree.fromstring(
            text, forbid_dtd=True, forbid_entities=True, forbid_external=True
        )
    except DefusedXmlException as err:
        return Rejection("forbidden_xml", f"{type(err).__name__}: DTDs and entities are refused")
    except ParseError as err:
        return Rejection("malformed", f"not well-formed XML ({_one_line(str(err))})")
    if root.tag != "domain":
        return Rejection("not_a_domain", "the root element is not <domain>")
    name_element = root.find("name")
    uuid_element = root.find("uuid")
    return _config(
        None if name_element is None else name_element.text,
        None if uuid_element is None else (uuid_element.text or "").strip(),
    )


_XL_KEYS = ("name", "uuid")
_XL_SETTING = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*?)\s*")
_XL_STRING = re.compile(r"\"([^\"\\]*)\"|'([^'\\]*)'")


def _parse_xl(text: str) -> ParsedConfig | Rejection:
    """Reads `name` and `uuid`; the rest of the file is xl's business and is not checked.

    A setting is `KEY = VALUE`, several may share a line separated by ';', and
    '#' starts a comment outside quotes. Strings are single- or double-quoted;
    escape sequences are refused rather than guessed at.
    """
    found: dict[str, str] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        for statement in _xl_statements(line):
            setting = _XL_SETTING.fullmatch(statement)
            if setting is None or setting.group(1) not in _XL_KEYS:
                continue
            key, value = setting.groups()
            string = _XL_STRING.fullmatch(value)
            if string is None:
                return Rejection("malformed", f"line {line_number}: {key} is not a plain string")
            if key in found:
                return Rejection("malformed", f"line {line_number}: {key} is set twice")
            found[key] = string.group(1) if string.group(1) is not None else string.group(2)
    return _config(found.get("name"), found.get("uuid"))


def _xl_statements(line: str) -> list[str]:
    """The line split at ';' outside quotes, without its comment."""
    statements: list[str] = []
    start, quote = 0, ""
    for index, char in enumerate(line):
        if quote:
            if char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == ";":
            statements.append(line[start:index])
            start = index + 1
        elif char == "#":
            statements.append(line[start:index])
            return statements
    statements.append(line[start:])
    return statements


def _config(name: str | None, raw_uuid: str | None) -> ParsedConfig | Rejection:
    if name is None or not name.strip():
        return Rejection("missing_name", "no domain name")
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        return Rejection("bad_name", f"the name is longer than {MAX_NAME_CHARS} or not printable")
    if raw_uuid is None:
        return ParsedConfig(name, None)
    try:
        parsed = uuid.UUID(raw_uuid)
    except ValueError:
        return Rejection("bad_uuid", "the UUID is not 32 hexadecimal digits")
    if len(set(parsed.bytes)) == 1:
        # The nil UUID and its kin are placeholders: every such file would claim one domain.
        return Rejection("bad_uuid", "the UUID is a placeholder (all its bytes are equal)")
    return ParsedConfig(name, str(parsed))


def _one_line(text: str) -> str:
    return " ".join(text.split())


_PARSERS: dict[Format, Callable[[str], ParsedConfig | Rejection]] = {
    "libvirt-xml": _parse_xml,
    "xl": _parse_xl,
}
