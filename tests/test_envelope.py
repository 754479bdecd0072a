"""Unit tests for publisher/contract/envelope.py (and publisher/core/redact.py).

A message is what consumers depend on: its CloudEvents attributes, AMQP headers
and routing key, and that its body validates against the published JSON schema
and parses with the CloudEvents SDK. Events are built with the real libvirt
catalog and the capabilities data the way the daemon builds it.
"""

from __future__ import annotations

import copy
import json
import tracemalloc
import uuid
from datetime import UTC, datetime
from typing import Any

import jsonschema
import libvirt
import pika.frame
import pika.spec
import pytest
from cloudevents.core.bindings.rabbitmq import RabbitMQMessage, from_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from jsonschema import Draft202012Validator, FormatChecker

from virtpub import __version__
from virtpub.contract import envelope, messages, schemas
from virtpub.contract.envelope import (
    CONTENT_TYPE,
    Envelope,
    MessageIds,
    OutgoingMessage,
    rfc3339,
)
from virtpub.contract.routing import FORMAT as ROUTING_KEY_FORMAT
from virtpub.contract.routing import RoutingKey
from virtpub.core.capabilities import BackendCapabilities, EventSupport
from virtpub.core.event import GONE, DomainEvent, DomainFacts, DomainRef, DomainState
from virtpub.core.redact import redact_url
from virtpub.core.tracker import Publication, Tracker
from virtpub.drivers.libvirt.domain import source_uri
from virtpub.drivers.libvirt.events import FIELDS, Catalog, EventIdSpec, Field, normalize

HOST = "hv01"
BACKEND = source_uri(HOST, "qemu:///system")
RECEIVED_AT = 1_700_000_000.123456
UUID = "6f1c6a52-3d0e-4b8a-9a43-1f0e2f7f6a11"
CATALOG = Catalog(vars(libvirt))
SPECS = {spec.constant: spec for spec in CATALOG.ids}
RUNNING = CATALOG.domain_state(libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
SHUTOFF = CATALOG.domain_state(libvirt.VIR_DOMAIN_SHUTOFF, libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED)


def domain_event(constant: str, *args: object, dom_id: int | None = 7) -> DomainEvent:
    return normalize(
        CATALOG,
        SPECS[constant],
        backend=BACKEND,
        domain=DomainRef(uuid=UUID, name="web-01", id=dom_id),
        args=args,
        received_at=RECEIVED_AT,
    )


def published(
    event: DomainEvent,
    *,
    persistent: bool = True,
    state: DomainState | None = None,
    seq: int = 3,
    rename: tuple[str, str | None] | None = None,
) -> Publication:
    """What the Tracker hands the envelope: by default the state the event implies, else
    running for a running domain (it has an id) and shut off otherwise."""
    if state is None:
        state = event.state or (RUNNING if event.domain.id is not None else SHUTOFF)
    return Publication(event, persistent, state, seq, rename)


def body_of(message: OutgoingMessage) -> dict[str, Any]:
    return json.loads(message.body)


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(schemas.info(name).load(), format_checker=FormatChecker())


def capabilities_data() -> dict[str, Any]:
    """Shaped like Daemon._capabilities, with one backend built by BackendCapabilities."""
    backend = BackendCapabilities(
        driver="libvirt",
        source=BACKEND,
        uri="qemu:///system",
        hypervisor_type="QEMU",
        hypervisor_version=None,
        libvirt_version="10.0.0",
        events={
            **{name: EventSupport("native") for name in CATALOG.event_types()},
            **{name: EventSupport("derived") for name in ("added", "removed", "snapshot")},
            "block_threshold": EventSupport("unsupported", "not supported by this driver"),
            "pmsuspended": EventSupport("polled", "the backend does not emit it", 10.0),
        },
    )
    return {
        "publisher": {"name": "virtpub", "version": __version__},
        "host_id": HOST,
        "routing_key_format": ROUTING_KEY_FORMAT,
        "schemas": {name: schemas.info(name).version for name in schemas.ALL},
        "backends": [backend.to_json()],
    }


@pytest.fixture
def stopped() -> OutgoingMessage:
    return Envelope(HOST).domain_event(published(domain_event("LIFECYCLE", 5, 1, dom_id=None)), 42)


@pytest.fixture
def snapshot_begin() -> OutgoingMessage:
    return snapshot_message("begin")


@pytest.fixture
def capabilities() -> OutgoingMessage:
    message = messages.Capabilities.from_data(capabilities_data())
    return Envelope(HOST).publisher_message(message, 1, RECEIVED_AT)


def test_format_checker_really_checks_the_formats_the_schemas_use() -> None:
    """Without rfc3339-validator, `date-time` would silently pass anything."""
    assert {"uuid", "date-time"} <= set(FormatChecker().checkers)


# --- routing keys ----------------------------------------------------------------------------


def test_routing_key_with_detail() -> None:
    key = RoutingKey(1, "hv01", "domain", "stopped", "destroyed")
    assert str(key) == "v1.hv01.domain.stopped.destroyed"
    assert RoutingKey.parse(str(key)) == key


@pytest.mark.parametrize(
    "text", ["", "v1.hv01.domain", "x1.hv01.domain.started", "v.hv01.domain.started", "v1..a.b"]
)
def test_a_key_that_is_not_virtpubs_does_not_parse(text: str) -> None:
    assert RoutingKey.parse(text) is None


@pytest.mark.parametrize("detail", [None, ""])
def test_routing_key_without_detail_has_four_segments(detail: str | None) -> None:
    key = RoutingKey(2, "hv01", "domain", "rtc_change", detail)
    assert str(key) == "v2.hv01.domain.rtc_change"
    assert RoutingKey.parse(str(key)) == RoutingKey(2, "hv01", "domain", "rtc_change")


# --- a domain event message --------------------------------------------------------------------


def test_domain_event_cloudevents_attributes(stopped: OutgoingMessage) -> None:
    body = body_of(stopped)
    assert body["specversion"] == "1.0"
    assert body["id"] == stopped.id
    assert str(uuid.UUID(body["id"])) == body["id"]
    assert body["type"] == stopped.type == "org.virtpub.domain.stopped"
    assert body["source"] == BACKEND
    assert body["subject"] == UUID
    assert body["datacontenttype"] == "application/json"
    assert body["dataschema"] == schemas.info(schemas.DOMAIN_EVENT).uri
    assert body["sequence"] == stopped.sequence == 42


def test_time_is_rfc3339_utc_of_received_at(stopped: OutgoingMessage) -> None:
    time = body_of(stopped)["time"]
    assert time.endswith("Z")
    assert datetime.fromisoformat(time).timestamp() == pytest.approx(RECEIVED_AT, abs=1e-6)
    assert stopped.timestamp == int(RECEIVED_AT)


def test_rfc3339_keeps_microseconds_and_whole_seconds() -> None:
    assert rfc3339(0) == "1970-01-01T00:00:00.000000Z"
    assert rfc3339(1.5) == "1970-01-01T00:00:01.500000Z"


def test_lifecycle_data_and_codes(stopped: OutgoingMessage) -> None:
    assert body_of(stopped)["data"] == {
        "domain": {"uuid": UUID, "name": "web-01"},
        "event": "stopped",
        "detail": "destroyed",
        "codes": {"event_id": libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, "event": 5, "detail": 1},
        "origin": "libvirt",
        "persistent": True,
        "state": {
            "state": "shutoff",
            "reason": "destroyed",
            "state_code": libvirt.VIR_DOMAIN_SHUTOFF,
            "reason_code": libvirt.VIR_DOMAIN_SHUTOFF_DESTROYED,
        },
        "seq": 3,
        "info": {},
    }


def test_running_domain_id_and_info_are_in_the_data() -> None:
    message = Envelope(HOST).domain_event(published(domain_event("RTC_CHANGE", -3600)), 3)
    data = body_of(message)["data"]
    assert data["domain"] == {"uuid": UUID, "name": "web-01", "id": 7}
    assert data["codes"] == {"event_id": libvirt.VIR_DOMAIN_EVENT_ID_RTC_CHANGE}
    assert (data["detail"], data["info"]) == (None, {"utcoffset": -3600})


# --- the domain's situation after the event (domain-event 1.1) ---------------------------------


@pytest.mark.parametrize("persistent", [True, False])
def test_persistence_and_seq_come_from_the_publication(persistent: bool) -> None:
    publication = published(domain_event("REBOOT"), persistent=persistent, seq=17)
    data = body_of(Envelope(HOST).domain_event(publication, 99))["data"]
    assert (data["persistent"], data["seq"]) == (persistent, 17)
    assert body_of(Envelope(HOST).domain_event(publication, 99))["sequence"] == 99


def test_state_carries_names_and_codes() -> None:
    paused = CATALOG.domain_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)
    message = Envelope(HOST).domain_event(published(domain_event("REBOOT"), state=paused), 1)
    assert body_of(message)["data"]["state"] == {
        "state": "paused",
        "reason": "ioerror",
        "state_code": libvirt.VIR_DOMAIN_PAUSED,
        "reason_code": libvirt.VIR_DOMAIN_PAUSED_IOERROR,
    }


def test_state_of_an_unnamed_code_is_still_published() -> None:
    future = CATALOG.domain_state(42, 9)
    message = Envelope(HOST).domain_event(published(domain_event("REBOOT"), state=future), 1)
    body = body_of(message)
    assert body["data"]["state"] == {
        "state": "unknown_42",
        "reason": "unknown_9",
        "state_code": 42,
        "reason_code": 9,
    }
    validator(schemas.DOMAIN_EVENT).validate(body)


@pytest.mark.parametrize(
    ("state", "has_id"),
    [
        (RUNNING, True),
        (CATALOG.domain_state(libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_USER), True),
        (SHUTOFF, False),
        # An unknown state may be a running one: the id the event carried is kept.
        (DomainState("nostate", "unknown", libvirt.VIR_DOMAIN_NOSTATE, 0), True),
    ],
    ids=lambda v: v.state if isinstance(v, DomainState) else str(v),
)
def test_domain_id_is_omitted_when_the_state_is_not_active(
    state: DomainState, has_id: bool
) -> None:
    """A stale runtime id (the event still had one) must not outlive the run it belonged to."""
    message = Envelope(HOST).domain_event(published(domain_event("REBOOT"), state=state), 1)
    domain = body_of(message)["data"]["domain"]
    assert ("id" in domain) is has_id
    if has_id:
        assert domain["id"] == 7


def test_rename_is_present_only_when_given() -> None:
    renamed = domain_event("LIFECYCLE", libvirt.VIR_DOMAIN_EVENT_DEFINED, 2, dom_id=None)
    assert renamed.detail == "renamed"
    envelope = Envelope(HOST)
    with_rename = body_of(envelope.domain_event(published(renamed, rename=("web-01", "web-02")), 1))
    assert with_rename["data"]["rename"] == {"old_name": "web-01", "new_name": "web-02"}
    validator(schemas.DOMAIN_EVENT).validate(with_rename)
    unknown_new = body_of(envelope.domain_event(published(renamed, rename=("web-01", None)), 2))
    assert unknown_new["data"]["rename"] == {"old_name": "web-01", "new_name": None}
    validator(schemas.DOMAIN_EVENT).validate(unknown_new)
    assert "rename" not in body_of(envelope.domain_event(published(renamed), 3))["data"]


def tracked(*events: DomainEvent) -> list[Publication]:
    """Publications as the daemon gets them: through a Tracker, the domain new to it."""
    tracker = Tracker(BACKEND)
    facts = DomainFacts(UUID, "web-01", 7, False, RUNNING)
    out: list[Publication] = []
    for event in events:
        out.extend(tracker.apply(event, lambda uuid: facts if uuid == UUID else GONE))
    return out


def test_derived_added_and_removed_have_no_codes_and_validate() -> None:
    started = domain_event("LIFECYCLE", libvirt.VIR_DOMAIN_EVENT_STARTED, 0)
    stopped = domain_event("LIFECYCLE", libvirt.VIR_DOMAIN_EVENT_STOPPED, 1, dom_id=None)
    envelope = Envelope(HOST)
    bodies = [
        body_of(envelope.domain_event(p, n))
        for n, p in enumerate(tracked(started, stopped), start=1)
    ]
    summary = [(b["data"]["event"], b["data"]["detail"], b["data"]["origin"]) for b in bodies]
    assert summary == [
        ("added", "started", "derived"),
        ("started", "booted", "libvirt"),
        ("stopped", "destroyed", "libvirt"),
        ("removed", "stopped", "derived"),
    ]
    added, started_body, stopped_body, removed = bodies
    assert "codes" not in added["data"]
    assert "codes" not in removed["data"]
    assert started_body["data"]["codes"]["event"] == libvirt.VIR_DOMAIN_EVENT_STARTED
    assert stopped_body["data"]["codes"]["event"] == libvirt.VIR_DOMAIN_EVENT_STOPPED
    assert [b["data"]["seq"] for b in bodies] == [1, 2, 3, 4]
    assert [b["data"]["persistent"] for b in bodies] == [False] * 4
    assert [b["data"]["state"]["state"] for b in bodies] == [
        "running",
        "running",
        "shutoff",
        "shutoff",
    ]
    assert added["data"]["domain"] == {"uuid": UUID, "name": "web-01", "id": 7}
    assert removed["data"]["domain"] == {"uuid": UUID, "name": "web-01"}
    for body in bodies:
        validator(schemas.DOMAIN_EVENT).validate(body)


def test_derived_event_routing_key_names_the_cause() -> None:
    (added, _) = tracked(domain_event("LIFECYCLE", libvirt.VIR_DOMAIN_EVENT_STARTED, 0))
    message = Envelope(HOST).domain_event(added, 1)
    assert message.routing_key == f"v1.{HOST}.domain.added.started"
    assert message.type == "org.virtpub.domain.added"
    assert message.basic_properties().headers["detail"] == "started"


def test_snapshot_and_resync_entries_have_no_codes_and_validate() -> None:
    tracker = Tracker(BACKEND)
    listing = [DomainFacts(UUID, "web-01", 7, True, RUNNING)]
    resynced = tracker.reconcile(listing, "resync", RECEIVED_AT)
    snapshot = tracker.snapshot(listing, RECEIVED_AT)
    envelope = Envelope(HOST)
    bodies = [body_of(envelope.domain_event(p, n)) for n, p in enumerate(resynced + snapshot, 1)]
    assert [(b["data"]["event"], b["data"]["origin"]) for b in bodies] == [
        ("added", "resync"),
        ("defined", "resync"),
        ("started", "resync"),
        ("snapshot", "snapshot"),
    ]
    assert all("codes" not in b["data"] for b in bodies)
    assert bodies[-1]["data"]["seq"] == 4
    assert envelope.domain_event(snapshot[0], 9).routing_key == f"v1.{HOST}.domain.snapshot"
    for body in bodies:
        validator(schemas.DOMAIN_EVENT).validate(body)


def test_domain_event_headers_and_routing_key(stopped: OutgoingMessage) -> None:
    info = schemas.info(schemas.DOMAIN_EVENT)
    assert stopped.basic_properties().headers == {
        "host_id": HOST,
        "entity": "domain",
        "event": "stopped",
        "detail": "destroyed",
        "schema": schemas.DOMAIN_EVENT,
        "schema_version": info.version,
    }
    assert stopped.routing_key == f"v{info.major}.{HOST}.domain.stopped.destroyed"


def test_event_without_detail_has_no_detail_header_or_segment() -> None:
    message = Envelope(HOST).domain_event(published(domain_event("REBOOT")), 3)
    assert "detail" not in message.basic_properties().headers
    assert message.routing_key.endswith(".domain.reboot")


def test_each_message_gets_a_fresh_id() -> None:
    envelope, publication = Envelope(HOST), published(domain_event("REBOOT"))
    assert envelope.domain_event(publication, 1).id != envelope.domain_event(publication, 2).id


def test_body_is_compact_utf8_json() -> None:
    """Non-ASCII domain names travel as UTF-8, not \\u escapes."""
    event = normalize(
        CATALOG,
        SPECS["REBOOT"],
        backend=BACKEND,
        domain=DomainRef(uuid=UUID, name="café"),
        args=(),
        received_at=RECEIVED_AT,
    )
    body = Envelope(HOST).domain_event(published(event), 1).body
    assert "café".encode() in body
    assert b", " not in body


def test_a_body_in_memory_takes_about_its_own_length() -> None:
    """Messages wait in memory by the thousand (a snapshot, the broker's window): a body must
    not keep the encoder's working buffer (orjson's is 4 KiB or more)."""
    envelope, publication = Envelope(HOST), published(domain_event("REBOOT"))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        bodies = [envelope.domain_event(publication, n).body for n in range(500)]
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held / len(bodies) < 2 * len(bodies[0])


# --- schema validation -----------------------------------------------------------------------


def test_domain_event_validates_against_its_schema(stopped: OutgoingMessage) -> None:
    validator(schemas.DOMAIN_EVENT).validate(body_of(stopped))


def sample_args(spec: EventIdSpec, info_schema: dict[str, Any]) -> list[object]:
    """Plausible callback arguments for an ID, typed from the schema's description of it."""
    props = info_schema.get("properties", {})

    def value(field: Field) -> object:
        if field.enum is not None:
            return 0
        if field.kind == "address":
            return {"family": 0, "node": "192.0.2.1", "service": "5900"}
        if field.kind == "subject":
            return [("x509dname", "CN=alice")]
        kind = props[field.name].get("type")
        kinds = kind if isinstance(kind, list) else [kind]
        if "integer" in kinds:
            return 1
        if "object" in kinds:
            return {"name": "value"}
        return "text"

    return [value(field) for field in spec.fields or ()]


def info_schemas() -> dict[str, dict[str, Any]]:
    branches = schemas.info(schemas.DOMAIN_EVENT).load()["$defs"]["data"]["allOf"]
    return {
        b["if"]["properties"]["event"]["const"]: b["then"]["properties"]["info"]
        for b in branches
        if "const" in b["if"]["properties"].get("event", {})
        and "properties" in b["then"]["properties"]["info"]
    }


@pytest.mark.parametrize(
    "constant", [c for c, spec in SPECS.items() if spec.fields is not None], ids=str
)
def test_every_described_event_id_of_the_binding_validates(constant: str) -> None:
    """FIELDS and the schema must agree on each ID's info (names, `_code`s, types)."""
    spec = SPECS[constant]
    per_event = info_schemas()
    assert spec.event_type in per_event, f"schema has no info description for {spec.event_type}"
    event = domain_event(constant, *sample_args(spec, per_event[spec.event_type]))
    validator(schemas.DOMAIN_EVENT).validate(
        body_of(Envelope(HOST).domain_event(published(event), 1))
    )


@pytest.mark.parametrize("constant", sorted(set(FIELDS) - set(SPECS)), ids=str)
def test_every_described_event_id_newer_than_the_binding_validates(constant: str) -> None:
    """IDs of a newer libvirt (VCPU_REMOVED, CHANNEL_LIFECYCLE behind a 9.0 binding) are
    checked too, so a binding built against that libvirt publishes what the schema says."""
    catalog = Catalog({**vars(libvirt), f"VIR_DOMAIN_EVENT_ID_{constant}": 900})
    (spec,) = [s for s in catalog.ids if s.constant == constant]
    per_event = info_schemas()
    assert spec.event_type in per_event, f"schema has no info description for {spec.event_type}"
    event = normalize(
        catalog,
        spec,
        backend=BACKEND,
        domain=DomainRef(uuid=UUID, name="web-01", id=7),
        args=sample_args(spec, per_event[spec.event_type]),
        received_at=RECEIVED_AT,
    )
    assert set(event.info) >= {field.name for field in FIELDS[constant]}
    validator(schemas.DOMAIN_EVENT).validate(
        body_of(Envelope(HOST).domain_event(published(event), 1))
    )


def test_every_lifecycle_type_of_the_binding_is_in_the_schema() -> None:
    branches = schemas.info(schemas.DOMAIN_EVENT).load()["$defs"]["data"]["allOf"]
    (lifecycle,) = [
        b
        for b in branches
        if "enum" in b["if"]["properties"].get("event", {})
        and b["if"]["properties"].get("origin") == {"const": "libvirt"}
    ]
    assert set(CATALOG.lifecycle_types) <= set(lifecycle["if"]["properties"]["event"]["enum"])


def test_id_without_known_fields_validates_with_args() -> None:
    catalog = Catalog({**vars(libvirt), "VIR_DOMAIN_EVENT_ID_FROM_THE_FUTURE": 999})
    spec = next(s for s in catalog.ids if s.constant == "FROM_THE_FUTURE")
    event = normalize(
        catalog,
        spec,
        backend=BACKEND,
        domain=DomainRef(uuid=UUID, name="web-01"),
        args=(1, (2, "x")),
        received_at=RECEIVED_AT,
    )
    body = body_of(Envelope(HOST).domain_event(published(event), 1))
    assert body["data"]["info"] == {"args": [1, [2, "x"]]}
    validator(schemas.DOMAIN_EVENT).validate(body)


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("data", "event"), "Stopped!"),
        (("data", "origin"), "rumour"),
        (("time",), "yesterday"),
        (("id",), "not-a-uuid"),
        (("subject",), "web-01"),
        (("sequence",), 0),
        (("data", "info"), {"utcoffset": 1}),
        (("data", "seq"), 0),
        (("data", "persistent"), "yes"),
        (("data", "state", "state"), "Shut Off"),
        (("data", "state", "reason_code"), "2"),
        (("data", "state", "extra"), 1),
        (("data", "rename"), {"old_name": "web-01"}),
        (("data", "codes"), {"event": 5, "detail": 1}),
        (("data", "codes"), {"event_id": 0, "detail": 1}),
        (("data", "domain", "id"), -1),
    ],
)
def test_schema_rejects_a_wrong_field(
    stopped: OutgoingMessage, path: tuple[str, ...], bad: Any
) -> None:
    """Proves the schema (and its format checks) bite; a schema accepting anything is useless."""
    body = copy.deepcopy(body_of(stopped))
    *parents, last = path
    target = body
    for key in parents:
        target = target[key]
    target[last] = bad
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.DOMAIN_EVENT).validate(body)


@pytest.mark.parametrize("field", ["persistent", "state", "seq"])
def test_schema_requires_the_situation_fields(stopped: OutgoingMessage, field: str) -> None:
    body = copy.deepcopy(body_of(stopped))
    del body["data"][field]
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.DOMAIN_EVENT).validate(body)


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"event": "added", "detail": "booted", "origin": "derived"}, "added cause is an enum"),
        ({"event": "removed", "detail": "vanished", "origin": "libvirt"}, "libvirt never says it"),
        ({"event": "snapshot", "detail": None, "origin": "resync"}, "snapshot origin"),
        ({"event": "snapshot", "detail": "now", "origin": "snapshot"}, "snapshot has no detail"),
        ({"event": "stopped", "detail": "destroyed", "origin": "resync", "info": {"a": 1}}, "info"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_schema_rejects_wrong_existence_and_snapshot_events(
    stopped: OutgoingMessage, changes: dict[str, Any], why: str
) -> None:
    body = copy.deepcopy(body_of(stopped))
    del body["data"]["codes"]
    body["data"].update(changes)
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.DOMAIN_EVENT).validate(body)


def test_schema_requires_codes_on_libvirt_lifecycle_events(stopped: OutgoingMessage) -> None:
    body = copy.deepcopy(body_of(stopped))
    del body["data"]["codes"]
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.DOMAIN_EVENT).validate(body)
    body["data"]["origin"] = "resync"
    validator(schemas.DOMAIN_EVENT).validate(body)


# --- the capabilities message ------------------------------------------------------------------


def test_capabilities_message_validates_against_its_schema(capabilities: OutgoingMessage) -> None:
    validator(schemas.PUBLISHER_CAPABILITIES).validate(body_of(capabilities))


def test_capabilities_message_attributes(capabilities: OutgoingMessage) -> None:
    body = body_of(capabilities)
    info = schemas.info(schemas.PUBLISHER_CAPABILITIES)
    assert body["type"] == "org.virtpub.publisher.capabilities"
    assert body["source"] == f"virtpub://{HOST}/publisher"
    assert body["subject"] == HOST
    assert body["dataschema"] == info.uri
    assert capabilities.routing_key == f"v{info.major}.{HOST}.publisher.capabilities"
    assert capabilities.basic_properties().headers["schema"] == schemas.PUBLISHER_CAPABILITIES
    assert capabilities.basic_properties().headers["schema_version"] == info.version


def test_capabilities_schema_rejects_an_unknown_support_status(
    capabilities: OutgoingMessage,
) -> None:
    body = copy.deepcopy(body_of(capabilities))
    body["data"]["backends"][0]["events"]["reboot"]["status"] = "maybe"
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.PUBLISHER_CAPABILITIES).validate(body)


def test_capabilities_schema_requires_the_basis_of_every_entry(
    capabilities: OutgoingMessage,
) -> None:
    body = copy.deepcopy(body_of(capabilities))
    del body["data"]["backends"][0]["events"]["reboot"]["basis"]
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.PUBLISHER_CAPABILITIES).validate(body)


def test_capabilities_to_json_omits_absent_reasons_and_sorts_events() -> None:
    backend = capabilities_data()["backends"][0]
    assert backend["events"]["block_threshold"] == {
        "status": "unsupported",
        "basis": "probe",
        "reason": "not supported by this driver",
    }
    assert backend["events"]["reboot"] == {"status": "native", "basis": "probe"}
    assert backend["events"]["added"] == {"status": "derived", "basis": "probe"}
    assert backend["events"]["pmsuspended"] == {
        "status": "polled",
        "basis": "probe",
        "reason": "the backend does not emit it",
        "interval_s": 10.0,
    }
    assert list(backend["events"]) == sorted(backend["events"])


@pytest.mark.parametrize("interval", [None, 0, -1, "10"])
def test_capabilities_schema_requires_a_positive_interval_for_polled_events(
    capabilities: OutgoingMessage, interval: object
) -> None:
    body = copy.deepcopy(body_of(capabilities))
    entry = body["data"]["backends"][0]["events"]["pmsuspended"]
    if interval is None:
        del entry["interval_s"]
    else:
        entry["interval_s"] = interval
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.PUBLISHER_CAPABILITIES).validate(body)


# --- snapshot brackets and backend connection messages ---------------------------------------

SNAPSHOT_ID = "0d5c2a8e-7b4f-4c1e-9a3d-6f2b8e1c4a70"
REQUEST_ID = "6a1f3c9e-2d4b-4e8a-b7c5-0f9e8d7c6b5a"


def snapshot_message(phase: str, **extra: Any) -> OutgoingMessage:
    """Shaped like Daemon._resync's bracket."""
    data = {"backend": BACKEND, "snapshot_id": SNAPSHOT_ID, "reason": "startup", "phase": phase}
    message = messages.Snapshot.from_data({**data, **extra})
    return Envelope(HOST).publisher_message(message, 5, RECEIVED_AT)


def backend_message(connected: bool) -> OutgoingMessage:
    """Shaped like Daemon._backend_changed."""
    data: dict[str, Any] = {
        "backend": BACKEND,
        "uri": "qemu:///system",
        "connected": connected,
        "reason": None if connected else "End of file while reading data: Input/output error",
    }
    message = messages.Backend.from_data(data)
    return Envelope(HOST).publisher_message(message, 6, RECEIVED_AT)


@pytest.mark.parametrize(
    ("message", "name", "detail"),
    [
        (snapshot_message("begin"), schemas.PUBLISHER_SNAPSHOT, "begin"),
        (snapshot_message("end", domains=2), schemas.PUBLISHER_SNAPSHOT, "end"),
        (
            snapshot_message("end", domains=0, reason="requested", request_id=REQUEST_ID),
            schemas.PUBLISHER_SNAPSHOT,
            "end",
        ),
        (backend_message(True), schemas.PUBLISHER_BACKEND, "connected"),
        (backend_message(False), schemas.PUBLISHER_BACKEND, "disconnected"),
    ],
    ids=[
        "snapshot-begin",
        "snapshot-end",
        "snapshot-requested",
        "backend-connected",
        "backend-disconnected",
    ],
)
def test_publisher_event_with_detail(message: OutgoingMessage, name: str, detail: str) -> None:
    info = schemas.info(name)
    event = name.removeprefix("publisher-")
    body = body_of(message)
    assert message.routing_key == f"v{info.major}.{HOST}.publisher.{event}.{detail}"
    assert message.type == body["type"] == f"org.virtpub.publisher.{event}"
    assert message.basic_properties().headers == {
        "host_id": HOST,
        "entity": "publisher",
        "event": event,
        "detail": detail,
        "schema": name,
        "schema_version": info.version,
    }
    assert body["source"] == f"virtpub://{HOST}/publisher"
    assert body["subject"] == HOST
    assert body["dataschema"] == info.uri
    validator(name).validate(body)


@pytest.mark.parametrize(
    "message",
    [
        snapshot_message("end"),  # end must say how many domains the bracket held
        snapshot_message("middle"),
        snapshot_message("begin", reason="boredom"),
        snapshot_message("begin", snapshot_id="not-a-uuid"),
        snapshot_message("end", domains=-1),
        snapshot_message("begin", reason="requested"),  # a requested bracket names its request
        snapshot_message("begin", request_id=REQUEST_ID),  # only a requested one has an id
        snapshot_message("begin", reason="requested", request_id="not-a-uuid"),
    ],
    ids=[
        "end-without-count",
        "phase",
        "reason",
        "snapshot_id",
        "negative-count",
        "requested-without-id",
        "id-without-request",
        "request_id",
    ],
)
def test_snapshot_schema_rejects_a_wrong_bracket(message: OutgoingMessage) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.PUBLISHER_SNAPSHOT).validate(body_of(message))


def test_backend_schema_rejects_a_missing_connected_flag() -> None:
    body = copy.deepcopy(body_of(backend_message(True)))
    del body["data"]["connected"]
    with pytest.raises(jsonschema.ValidationError):
        validator(schemas.PUBLISHER_BACKEND).validate(body)


# --- CloudEvents SDK ---------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["stopped", "capabilities", "snapshot_begin"])
def test_message_parses_with_the_cloudevents_sdk(
    which: str, request: pytest.FixtureRequest
) -> None:
    message: OutgoingMessage = request.getfixturevalue(which)
    event = from_rabbitmq(
        RabbitMQMessage(headers={}, content_type=CONTENT_TYPE, body=message.body), JSONFormat()
    )
    assert event.get_id() == message.id
    assert event.get_type() == message.type
    assert event.get_data() == body_of(message)["data"]
    assert event.get_extension("sequence") == message.sequence


# --- redact_url --------------------------------------------------------------------------------


def test_redact_url_replaces_the_password() -> None:
    assert redact_url("amqp://guest:secret@rabbit:5672/%2F") == "amqp://guest:***@rabbit:5672/%2F"


@pytest.mark.parametrize("url", ["amqp://guest@rabbit/", "qemu:///system", "amqp://rabbit/"])
def test_redact_url_leaves_urls_without_password_unchanged(url: str) -> None:
    assert redact_url(url) == url


def test_redact_url_keeps_an_ipv6_host() -> None:
    assert (
        redact_url("amqps://u:secret@[2001:db8::1]:5671/v") == "amqps://u:***@[2001:db8::1]:5671/v"
    )


def test_redact_url_with_at_sign_in_password_hides_all_of_it() -> None:
    assert redact_url("amqp://u:p@ss@rabbit/") == "amqp://u:***@rabbit/"


def test_redact_url_that_does_not_parse_still_hides_the_password() -> None:
    assert redact_url("amqp://u:secret@[::1/") == "amqp://u:***@[::1/"
    assert redact_url("amqp://[::1/") == "amqp://[::1/"


@pytest.mark.parametrize("url", ["amqp://u:sec/ret@rabbit/", "amqp://u:sec?ret@rabbit/"])
def test_redact_url_hides_unencoded_reserved_characters_in_password(url: str) -> None:
    assert "ret@" not in redact_url(url)


def test_pre_encoded_properties_are_byte_for_byte_what_pika_would_send() -> None:
    """virtpub encodes AMQP properties itself (pika's table encoder is the costliest part of a
    publish); the bytes must be exactly pika's, or brokers and consumers would read garbage."""
    headers = {"host_id": "hv01", "event": "stopped", "detail": "destroyed", "schema": "é"}
    ours = envelope.encode_properties("id-1", 1_700_000_000, "org.virtpub.domain.stopped", headers)
    reference = pika.spec.BasicProperties(
        content_type=CONTENT_TYPE,
        headers=headers,
        delivery_mode=2,
        message_id="id-1",
        timestamp=1_700_000_000,
        type="org.virtpub.domain.stopped",
        app_id="virtpub",
    )
    assert ours == b"".join(reference.encode())


def test_message_ids_are_distinct_version_4_uuids() -> None:
    ids = MessageIds()
    drawn = [ids.next() for _ in range(3 * MessageIds.BATCH + 5)]
    assert len(set(drawn)) == len(drawn)
    for text in drawn:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert (parsed.version, parsed.variant) == (4, uuid.RFC_4122)


@pytest.mark.parametrize(
    "epoch", [0.0, 1_700_000_000.0, 1_700_000_000.123456, 1_700_000_000.9999996, 1_699_999_999.5]
)
def test_rfc3339_agrees_with_datetime(epoch: float) -> None:
    expected = datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")
    assert rfc3339(epoch) == expected.replace("+00:00", "Z")
