"""The message classes are the wire contract: pinned by a hash of their fields, held to the
locked schema versions, and checked against every sample and every schema.

After Nova's notification objects: change a class's fields and its pin here fails until
its VERSION (and so its schema's version, and a CHANGES line) moves with it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from virtpub.contract import messages, schemas
from virtpub.core.event import Codes, DomainState

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"

MESSAGE_HASHES = {
    "DomainEventMessage": "1.2-f5bc4f71222dbb30",
    "Capabilities": "1.2-79d74024cd88171f",
    "Snapshot": "1.2-8a4bcfd8b091f5a6",
    "Backend": "1.0-99c9cb92820af5d7",
    "Dropped": "1.1-7ef7f0bcacd003ba",
    "ConfigInvalid": "1.0-6b805a73e8b15259",
}
"""Class name to `VERSION-<hash of its field names and types>`. Update a hash only together
with the class's VERSION, its schema's version and a line in its CHANGES."""

REPRESENTATIVES: dict[type[messages.Message], messages.Message] = {
    messages.DomainEventMessage: messages.DomainEventMessage(
        domain=messages.DomainPart("6f1c6a52-3d0e-4b8a-9a43-1f0e2f7f6a11", "web-02", 7),
        event="defined",
        event_detail="renamed",
        origin="libvirt",
        persistent=True,
        state=DomainState("running", "booted", 1, 1),
        seq=3,
        codes=Codes(0, 0, 2),
        rename=messages.Rename("web-01", "web-02"),
    ),
    messages.Capabilities: messages.Capabilities(
        publisher_name="virtpub",
        publisher_version="0.1.0",
        host_id="hv01",
        routing_key_format="v<major>.<host_id>.<entity>.<event>[.<detail>]",
        schemas={name: schemas.info(name).version for name in schemas.ALL},
        backends=(),
    ),
    messages.Snapshot: messages.Snapshot(
        backend="virtpub://hv01/libvirt/qemu%3A%2F%2F%2Fsystem",
        snapshot_id="5eed0000-0000-4000-8000-00000000beef",
        reason="requested",
        phase="end",
        request_id="5eed0000-0000-4000-8000-0000000000a5",
        domains=2,
    ),
    messages.Backend: messages.Backend(
        backend="virtpub://hv01/libvirt/qemu%3A%2F%2F%2Fsystem",
        uri="qemu:///system",
        connected=False,
        reason="connection closed",
    ),
    messages.Dropped: messages.Dropped(
        reason="spool_full",
        policy="drop-oldest",
        count=2,
        events={"org.virtpub.domain.started": 2},
        backends=("virtpub://hv01/libvirt/qemu%3A%2F%2F%2Fsystem",),
        since="2023-11-14T22:19:58.750000Z",
        first_sequence=10,
        last_sequence=11,
    ),
    messages.ConfigInvalid: messages.ConfigInvalid(
        backend="virtpub://hv01/filesystem/%2Fetc%2Fxen",
        path="/etc/xen/web.cfg",
        reason="malformed",
        message="line 3: expected key = value",
    ),
}


def field_hash(cls: type[messages.Message]) -> str:
    """What the pin covers: each field's name and declared type, in order."""
    shape = [(item.name, str(item.type)) for item in dataclasses.fields(cls)]
    digest = hashlib.sha256(json.dumps(shape).encode()).hexdigest()[:16]
    return f"{cls.VERSION}-{digest}"


def stale_pins(classes: tuple[type[messages.Message], ...], pins: dict[str, str]) -> list[str]:
    """The classes whose fields or version no longer match their pin."""
    return [cls.__name__ for cls in classes if pins.get(cls.__name__) != field_hash(cls)]


def locked() -> dict[str, Any]:
    return dict(json.loads((SCHEMAS / "versions.json").read_text(encoding="utf-8")))


def samples() -> list[Path]:
    return sorted(SCHEMAS.glob("*/samples/*.json"))


def test_every_message_class_matches_its_pinned_fields_and_version() -> None:
    assert set(MESSAGE_HASHES) == {cls.__name__ for cls in messages.MESSAGES}
    assert stale_pins(messages.MESSAGES, MESSAGE_HASHES) == [], (
        "a message class changed: bump its VERSION (and its schema), add a CHANGES line,"
        " then update MESSAGE_HASHES"
    )


def test_the_pin_catches_a_field_changed_without_a_version_bump() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class Backend(messages.Backend):
        since: str = ""

    assert stale_pins((Backend,), MESSAGE_HASHES) == ["Backend"]


def test_the_pin_catches_a_field_whose_type_changed() -> None:
    @dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
    class ConfigInvalid(messages.Message):
        SCHEMA = messages.ConfigInvalid.SCHEMA
        VERSION = messages.ConfigInvalid.VERSION
        backend: str
        path: str
        reason: str
        message: int

    assert stale_pins((ConfigInvalid,), MESSAGE_HASHES) == ["ConfigInvalid"]


def test_every_schema_name_has_exactly_one_class() -> None:
    assert sorted(cls.SCHEMA for cls in messages.MESSAGES) == sorted(schemas.ALL)
    for name in schemas.ALL:
        assert name == messages.for_schema(name).SCHEMA


@pytest.mark.parametrize("cls", messages.MESSAGES, ids=lambda cls: cls.__name__)
def test_version_is_the_locked_version_of_its_schema(cls: type[messages.Message]) -> None:
    assert cls.VERSION == locked()[cls.SCHEMA]["version"] == schemas.info(cls.SCHEMA).version


@pytest.mark.parametrize("cls", messages.MESSAGES, ids=lambda cls: cls.__name__)
def test_changes_has_one_line_per_minor_version_oldest_first(
    cls: type[messages.Message],
) -> None:
    major, minor = (int(part) for part in cls.VERSION.split("."))
    expected = [f"{major}.{n}" for n in range(minor + 1)]
    assert [line.split(":", 1)[0] for line in cls.CHANGES] == expected


@pytest.mark.parametrize("path", samples(), ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_sample_parses_into_its_class_and_round_trips(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    cls = messages.for_schema(path.parent.parent.name)
    assert cls.from_data(data).data() == data


@pytest.mark.parametrize("cls", messages.MESSAGES, ids=lambda cls: cls.__name__)
def test_representative_data_validates_against_its_schema(cls: type[messages.Message]) -> None:
    instance = REPRESENTATIVES[cls]
    assert type(instance) is cls
    sample = next((SCHEMAS / cls.SCHEMA / "samples").glob("*.json"))
    document = copy.deepcopy(json.loads(sample.read_text(encoding="utf-8")))
    document["data"] = instance.data()
    validator = Draft202012Validator(
        schemas.info(cls.SCHEMA).load(), format_checker=FormatChecker()
    )
    assert [error.message for error in validator.iter_errors(document)] == []


def test_routing_parts_come_from_the_class() -> None:
    routes = {
        cls.__name__: (cls.ENTITY, instance.event_name, instance.detail)
        for cls, instance in REPRESENTATIVES.items()
    }
    assert routes == {
        "DomainEventMessage": ("domain", "defined", "renamed"),
        "Capabilities": ("publisher", "capabilities", None),
        "Snapshot": ("publisher", "snapshot", "end"),
        "Backend": ("publisher", "backend", "disconnected"),
        "Dropped": ("publisher", "dropped", "spool_full"),
        "ConfigInvalid": ("config", "invalid", None),
    }
