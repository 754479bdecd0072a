"""Unit tests for drivers/libvirt/events.py: libvirt callback arguments to DomainEvent values.

Two catalogs are used. A small fake constants mapping with invented names proves
the names really come from the binding's constants (not from a table in the
code); the real `vars(libvirt)` catalog pins what consumers actually receive.
No libvirt connection is ever opened.
"""

from __future__ import annotations

import dataclasses
from types import MappingProxyType

import libvirt
import pytest

from virtpub.core.event import Codes, DomainEvent, DomainRef
from virtpub.drivers.libvirt.events import (
    FIELDS,
    ID_PREFIX,
    LIFECYCLE_ID,
    Catalog,
    Enum,
    EventIdSpec,
    event_type_of,
    normalize,
    normalize_info,
)

DOMAIN = DomainRef(uuid="6f1c6a52-3d0e-4b8a-9a43-1f0e2f7f6a11", name="web-01", id=7)
BACKEND = "virtpub://hv01/libvirt/test"
RECEIVED_AT = 1_700_000_000.5

# Invented names: a catalog that yields "halted"/"zapped" can only have read them here.
FAKE_CONSTANTS: dict[str, object] = {
    "VIR_DOMAIN_EVENT_ID_LIFECYCLE": 0,
    "VIR_DOMAIN_EVENT_ID_RTC_CHANGE": 2,
    "VIR_DOMAIN_EVENT_ID_IO_ERROR": 4,
    "VIR_DOMAIN_EVENT_ID_IO_ERROR_REASON": 6,
    "VIR_DOMAIN_EVENT_ID_BLOCK_JOB": 8,
    "VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2": 16,
    "VIR_DOMAIN_EVENT_ID_GADGET_PLUGGED": 40,
    "VIR_DOMAIN_EVENT_ID_LAST": 41,
    "VIR_DOMAIN_EVENT_HALTED": 5,
    "VIR_DOMAIN_EVENT_HALTED_ZAPPED": 1,
    "VIR_DOMAIN_EVENT_HALTED_FROM_ORBIT": 2,
    "VIR_DOMAIN_EVENT_HALTED_LAST": 3,
    "VIR_DOMAIN_EVENT_WOKEN": 2,
    "VIR_DOMAIN_EVENT_LAST": 6,
    # Listed before the status names on purpose: setdefault would keep it if not skipped.
    "VIR_DOMAIN_BLOCK_JOB_TYPE_PULL": 1,
    "VIR_DOMAIN_BLOCK_JOB_TYPE_MIRROR": 2,
    "VIR_DOMAIN_BLOCK_JOB_DONE": 0,
    "VIR_DOMAIN_BLOCK_JOB_MIRRORING": 2,
    "VIR_DOMAIN_BLOCK_JOB_LAST": 3,
    "VIR_DOMAIN_EVENT_IO_ERROR_FREEZE": 1,
    "VIR_DOMAIN_EVENT_ID_NOT_A_CODE": "12",
    "NOT_LIBVIRT_AT_ALL": 77,
}


@pytest.fixture(scope="module")
def fake() -> Catalog:
    return Catalog(FAKE_CONSTANTS)


@pytest.fixture(scope="module")
def real() -> Catalog:
    return Catalog(vars(libvirt))


def spec_named(catalog: Catalog, constant: str) -> EventIdSpec:
    return next(spec for spec in catalog.ids if spec.constant == constant)


def event_for(catalog: Catalog, constant: str, *args: object) -> DomainEvent:
    return normalize(
        catalog,
        spec_named(catalog, constant),
        backend=BACKEND,
        domain=DOMAIN,
        args=args,
        received_at=RECEIVED_AT,
    )


# --- fake constants: names come from the binding, not from the code ---------------------


def test_lifecycle_names_come_from_the_constants_mapping(fake: Catalog) -> None:
    """An invented type/detail pair is named, so nothing is hard-coded per libvirt version."""
    assert fake.lifecycle(5, 1) == ("halted", "zapped")
    assert fake.lifecycle(5, 2) == ("halted", "from_orbit")


def test_unknown_lifecycle_type_names_both_codes_unknown(fake: Catalog) -> None:
    """A newer libvirtd's lifecycle type must still be published, not dropped."""
    assert fake.lifecycle(42, 3) == ("unknown_42", "unknown_3")


def test_unknown_lifecycle_detail_of_a_known_type_is_unknown_code(fake: Catalog) -> None:
    assert fake.lifecycle(5, 9) == ("halted", "unknown_9")


def test_last_sentinels_are_never_used_as_names(fake: Catalog) -> None:
    """`*_LAST` counts the enum; naming a real code after it would be a lie."""
    assert fake.lifecycle(5, 3) == ("halted", "unknown_3")
    assert fake.lifecycle(6, 0) == ("unknown_6", "unknown_0")
    assert "last" not in fake.lifecycle_types
    assert all(spec.constant != "LAST" for spec in fake.ids)
    assert fake.name(Enum("VIR_DOMAIN_BLOCK_JOB_"), 3) == "unknown_3"


def test_lifecycle_types_are_in_code_order(fake: Catalog) -> None:
    assert fake.lifecycle_types == ("woken", "halted")


def test_ids_skip_non_integer_constants_and_sort_by_code(fake: Catalog) -> None:
    assert [(spec.constant, spec.code) for spec in fake.ids] == [
        ("LIFECYCLE", 0),
        ("RTC_CHANGE", 2),
        ("IO_ERROR", 4),
        ("IO_ERROR_REASON", 6),
        ("BLOCK_JOB", 8),
        ("BLOCK_JOB_2", 16),
        ("GADGET_PLUGGED", 40),
    ]


def test_single_segment_enum_skips_multi_segment_names_when_resolving_status(
    fake: Catalog,
) -> None:
    """VIR_DOMAIN_BLOCK_JOB_TYPE_PULL shares the status prefix; it must not name status 1."""
    event = event_for(fake, "BLOCK_JOB_2", "vda", 1, 1)
    assert event.info["type"] == "pull"
    assert event.info["status"] == "unknown_1"
    assert event_for(fake, "BLOCK_JOB_2", "vda", 2, 2).info["status"] == "mirroring"


def test_enum_without_single_segment_keeps_multi_segment_names(fake: Catalog) -> None:
    """The skip is opt-in: the same prefix without it does pick up TYPE_PULL."""
    assert fake.name(Enum("VIR_DOMAIN_BLOCK_JOB_"), 1) == "type_pull"
    assert fake.name(Enum("VIR_DOMAIN_BLOCK_JOB_", single_segment=True), 1) == "unknown_1"


def test_enum_field_with_unknown_code_keeps_the_raw_code(fake: Catalog) -> None:
    event = event_for(fake, "IO_ERROR_REASON", "/dev/sdb", "virtio-disk1", 9, "enospc")
    assert event.info["action"] == "unknown_9"
    assert event.info["action_code"] == 9


def test_id_without_known_fields_is_published_positionally(fake: Catalog) -> None:
    """An ID this module cannot describe still reaches consumers, as plain JSON args."""
    spec = spec_named(fake, "GADGET_PLUGGED")
    assert spec.fields is None
    assert spec.event_type == "gadget_plugged"
    event = event_for(fake, "GADGET_PLUGGED", 1, ("a", 2), {3: (4,)}, None)
    assert dict(event.info) == {"args": [1, ["a", 2], {"3": [4]}, None]}


def test_superseded_ids_are_tried_after_every_other_id(fake: Catalog) -> None:
    order = [spec.constant for spec in fake.subscriptions()]
    assert order == [
        "LIFECYCLE",
        "RTC_CHANGE",
        "IO_ERROR_REASON",
        "BLOCK_JOB_2",
        "GADGET_PLUGGED",
        "IO_ERROR",
        "BLOCK_JOB",
    ]


def test_event_types_list_lifecycle_types_then_each_pair_once(fake: Catalog) -> None:
    assert fake.event_types() == (
        "woken",
        "halted",
        "block_job",
        "gadget_plugged",
        "io_error",
        "rtc_change",
    )


# --- what libvirt 11.6 to 12.8 added (values from libvirt 12.8.0's libvirt-domain.h) --------

# The constants a binding built against libvirt 12.8 adds to a 9.0 one, as that header has them.
LIBVIRT_12_8_ADDITIONS: dict[str, object] = {
    "VIR_DOMAIN_EVENT_STARTED_RECREATED": 5,
    "VIR_DOMAIN_EVENT_STOPPED_RECREATED": 7,
    "VIR_DOMAIN_EVENT_SUSPENDED_GUEST_SHUTDOWN": 9,
    "VIR_DOMAIN_EVENT_ID_NIC_MAC_CHANGE": 27,
    "VIR_DOMAIN_EVENT_ID_VCPU_REMOVED": 28,
    "VIR_DOMAIN_EVENT_ID_CHANNEL_LIFECYCLE": 29,
    "VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_STATE_CONNECTED": 1,
    "VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_STATE_DISCONNECTED": 2,
    "VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_REASON_UNKNOWN": 0,
    "VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_REASON_DOMAIN_STARTED": 1,
    "VIR_CONNECT_DOMAIN_EVENT_CHANNEL_LIFECYCLE_REASON_CHANNEL": 2,
}


def catalog_12_8(binding_version: tuple[int, int, int] | None) -> Catalog:
    return Catalog({**vars(libvirt), **LIBVIRT_12_8_ADDITIONS}, binding_version)


@pytest.mark.parametrize(
    ("codes", "names"),
    [
        ((2, 5), ("started", "recreated")),
        ((5, 7), ("stopped", "recreated")),
        ((3, 9), ("suspended", "guest_shutdown")),
    ],
)
def test_details_of_libvirt_11_6_and_11_10_are_named_by_a_binding_that_has_them(
    codes: tuple[int, int], names: tuple[str, str]
) -> None:
    assert catalog_12_8((12, 8, 0)).lifecycle(*codes) == names


def test_an_older_binding_still_publishes_the_new_details_by_code(real: Catalog) -> None:
    """A 12.x libvirtd behind Debian 12's 9.0 binding: the detail is unknown_<code>, not lost."""
    if hasattr(libvirt, "VIR_DOMAIN_EVENT_STARTED_RECREATED"):
        pytest.skip("this binding names the 11.6 details")
    assert real.lifecycle(2, 5) == ("started", "unknown_5")
    event = event_for(real, LIFECYCLE_ID, 3, 9)
    assert (event.event, event.detail) == ("suspended", "unknown_9")
    assert event.codes == Codes(event_id=0, event=3, detail=9)
    assert event.state is not None and event.state.state == "paused"


def test_vcpu_removed_carries_the_xml_vcpu_id() -> None:
    event = event_for(catalog_12_8((12, 8, 0)), "VCPU_REMOVED", 3)
    assert (event.event, event.detail) == ("vcpu_removed", None)
    assert event.codes == Codes(event_id=28)
    assert dict(event.info) == {"vcpu_id": 3}


@pytest.mark.parametrize("version", [(12, 4, 0), (12, 8, 0), None])
def test_channel_lifecycle_is_withheld_where_the_binding_would_crash(
    version: tuple[int, int, int] | None,
) -> None:
    catalog = catalog_12_8(version)
    assert set(catalog.withheld) == {"CHANNEL_LIFECYCLE"}
    assert "(dom, channelName, state, reason)" in catalog.withheld["CHANNEL_LIFECYCLE"]
    subscribed = {spec.constant for spec in catalog.subscriptions()}
    assert "CHANNEL_LIFECYCLE" not in subscribed
    assert {"VCPU_REMOVED", "NIC_MAC_CHANGE"} <= subscribed
    if version is None:
        assert catalog.withheld["CHANNEL_LIFECYCLE"].startswith("the libvirt-python version is")


def test_a_binding_after_the_defect_subscribes_and_names_the_channel_event() -> None:
    catalog = catalog_12_8((12, 9, 0))
    assert catalog.withheld == {}
    assert "CHANNEL_LIFECYCLE" in {spec.constant for spec in catalog.subscriptions()}
    event = event_for(catalog, "CHANNEL_LIFECYCLE", "org.qemu.guest_agent.0", 1, 2)
    assert event.event == "channel_lifecycle"
    assert dict(event.info) == {
        "channel_name": "org.qemu.guest_agent.0",
        "state": "connected",
        "state_code": 1,
        "reason": "channel",
        "reason_code": 2,
    }


def test_a_binding_without_the_constant_withholds_nothing(real: Catalog) -> None:
    if hasattr(libvirt, "VIR_DOMAIN_EVENT_ID_CHANNEL_LIFECYCLE"):
        pytest.skip("this binding has the channel lifecycle ID")
    assert Catalog(vars(libvirt), None).withheld == {}


# --- event_type_of ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("constant", "event_type"),
    [
        ("BLOCK_JOB", "block_job"),
        ("BLOCK_JOB_2", "block_job"),
        ("IO_ERROR", "io_error"),
        ("IO_ERROR_REASON", "io_error"),
        ("RTC_CHANGE", "rtc_change"),
        ("PMSUSPEND_DISK", "pmsuspend_disk"),
    ],
)
def test_event_type_of_merges_each_id_pair(constant: str, event_type: str) -> None:
    assert event_type_of(constant) == event_type


# --- the real libvirt binding ------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "names"),
    [
        ((5, 1), ("stopped", "destroyed")),
        ((2, 0), ("started", "booted")),
        ((0, 1), ("defined", "updated")),
        ((3, 5), ("suspended", "from_snapshot")),
    ],
)
def test_real_lifecycle_names(
    real: Catalog, codes: tuple[int, int], names: tuple[str, str]
) -> None:
    assert real.lifecycle(*codes) == names


def test_real_lifecycle_event_keeps_names_and_raw_codes(real: Catalog) -> None:
    event = event_for(real, LIFECYCLE_ID, 5, 1)
    assert (event.event, event.detail) == ("stopped", "destroyed")
    assert (event.codes.event_id, event.codes.event, event.codes.detail) == (
        libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        5,
        1,
    )
    assert (event.backend, event.domain, event.origin) == (BACKEND, DOMAIN, "libvirt")
    assert event.received_at == RECEIVED_AT
    assert dict(event.info) == {}


def test_real_non_lifecycle_event_has_no_detail_and_only_the_id_code(real: Catalog) -> None:
    event = event_for(real, "RTC_CHANGE", 3600)
    assert (event.event, event.detail) == ("rtc_change", None)
    assert (event.codes.event_id, event.codes.event, event.codes.detail) == (
        libvirt.VIR_DOMAIN_EVENT_ID_RTC_CHANGE,
        None,
        None,
    )
    assert dict(event.info) == {"utcoffset": 3600}


@pytest.mark.parametrize("constant", ["BLOCK_JOB", "BLOCK_JOB_2"])
def test_real_block_job_status_ready(real: Catalog, constant: str) -> None:
    event = event_for(real, constant, "vda", libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY, 3)
    assert event.event == "block_job"
    assert dict(event.info) == {
        "disk": "vda",
        "type": "copy",
        "type_code": libvirt.VIR_DOMAIN_BLOCK_JOB_TYPE_COPY,
        "status": "ready",
        "status_code": 3,
    }


def test_real_graphics_addresses_and_subject_are_normalized(real: Catalog) -> None:
    event = event_for(
        real,
        "GRAPHICS",
        libvirt.VIR_DOMAIN_EVENT_GRAPHICS_CONNECT,
        {"family": libvirt.VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_IPV4, "node": "192.0.2.1"},
        {"family": libvirt.VIR_DOMAIN_EVENT_GRAPHICS_ADDRESS_IPV6, "node": "::1", "service": "1"},
        "vnc",
        [("x509dname", "CN=alice"), ("saslUsername", "alice")],
    )
    assert dict(event.info) == {
        "phase": "connect",
        "phase_code": libvirt.VIR_DOMAIN_EVENT_GRAPHICS_CONNECT,
        "local": {"family": "ipv4", "node": "192.0.2.1", "service": None},
        "remote": {"family": "ipv6", "node": "::1", "service": "1"},
        "auth_scheme": "vnc",
        "subject": [
            {"type": "x509dname", "name": "CN=alice"},
            {"type": "saslUsername", "name": "alice"},
        ],
    }


def test_graphics_phase_is_not_named_after_an_address_family(real: Catalog) -> None:
    """GRAPHICS_ADDRESS_IPV6 and GRAPHICS_INITIALIZE share code 1 and the phase prefix."""
    event = event_for(real, "GRAPHICS", 1, None, None, "none", [])
    assert event.info["phase"] == "initialize"


def test_graphics_odd_address_and_subject_values_do_not_break_the_event(real: Catalog) -> None:
    """Unknown families, non-int families and malformed subject pairs degrade, not raise."""
    event = event_for(
        real,
        "GRAPHICS",
        2,
        {"family": 99, "node": "n", "service": "s"},
        {"family": "ipv4", "node": None, "service": None},
        None,
        [("only-one",), ("x509dname", "CN=bob"), "junk"],
    )
    assert event.info["local"] == {"family": "unknown_99", "node": "n", "service": "s"}
    assert event.info["remote"] == {"family": None, "node": None, "service": None}
    assert event.info["subject"] == [{"type": "x509dname", "name": "CN=bob"}]


def test_real_io_error_reason_fields(real: Catalog) -> None:
    event = event_for(
        real,
        "IO_ERROR_REASON",
        "/var/lib/libvirt/images/web.qcow2",
        "virtio-disk0",
        libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE,
        "enospc",
    )
    assert event.event == "io_error"
    assert dict(event.info) == {
        "src_path": "/var/lib/libvirt/images/web.qcow2",
        "dev_alias": "virtio-disk0",
        "action": "pause",
        "action_code": libvirt.VIR_DOMAIN_EVENT_IO_ERROR_PAUSE,
        "reason": "enospc",
    }


def test_real_old_io_error_id_has_no_reason(real: Catalog) -> None:
    event = event_for(real, "IO_ERROR", "/dev/sdb", "virtio-disk1", 2)
    assert event.event == "io_error"
    assert "reason" not in event.info
    assert event.info["action"] == "report"


def test_tunable_params_are_copied_into_plain_json(real: Catalog) -> None:
    """The event must not share libvirt's dict: a later change to it must not leak in."""
    params: dict[str, object] = {"cputune.vcpu_quota": 50000, "cputune.emulatorpin": "0-3"}
    event = event_for(real, "TUNABLE", params)
    params["cputune.vcpu_quota"] = 1
    assert event.info["params"] == {"cputune.vcpu_quota": 50000, "cputune.emulatorpin": "0-3"}
    assert type(event.info["params"]) is dict


def test_unfamiliar_argument_types_become_strings() -> None:
    info = normalize_info(Catalog({}), None, [b"raw", 1.5, True, {"k": frozenset()}])
    assert info == {"args": ["b'raw'", 1.5, True, {"k": "frozenset()"}]}


def test_real_id_unknown_to_this_module_gives_positional_args() -> None:
    """A binding newer than FIELDS: the ID is subscribed and published with raw args."""
    catalog = Catalog({**vars(libvirt), f"{ID_PREFIX}FROM_THE_FUTURE": 999})
    spec = spec_named(catalog, "FROM_THE_FUTURE")
    assert spec.fields is None
    assert spec in catalog.subscriptions()
    event = event_for(catalog, "FROM_THE_FUTURE", 1, "x", (2, 3))
    assert event.event == "from_the_future"
    assert dict(event.info) == {"args": [1, "x", [2, 3]]}


def test_real_subscriptions_prefer_the_richer_id_of_each_pair(real: Catalog) -> None:
    order = [spec.constant for spec in real.subscriptions()]
    assert order[0] == LIFECYCLE_ID
    assert order.index("BLOCK_JOB_2") < order.index("BLOCK_JOB")
    assert order.index("IO_ERROR_REASON") < order.index("IO_ERROR")
    assert sorted(order) == sorted(spec.constant for spec in real.ids)


def test_every_real_event_id_has_its_arguments_described() -> None:
    """An ID missing from FIELDS would be published as opaque positional args."""
    binding_ids = {
        name.removeprefix(ID_PREFIX)
        for name, value in vars(libvirt).items()
        if name.startswith(ID_PREFIX) and isinstance(value, int) and not name.endswith("_LAST")
    }
    assert binding_ids - set(FIELDS) - {LIFECYCLE_ID} == set()


def test_every_real_lifecycle_type_has_named_details(real: Catalog) -> None:
    """Detail 0 of every lifecycle type exists in libvirt; it must never render unknown_0."""
    for kind in real.lifecycle_types:
        event, detail = real.lifecycle(getattr(libvirt, f"VIR_DOMAIN_EVENT_{kind.upper()}"), 0)
        assert event == kind
        assert not detail.startswith("unknown_"), kind


# --- immutability -------------------------------------------------------------------------


def test_domain_event_fields_cannot_be_reassigned(real: Catalog) -> None:
    event = event_for(real, "RTC_CHANGE", 60)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.event = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.domain.name = "other"  # type: ignore[misc]


def test_domain_event_info_cannot_be_mutated(real: Catalog) -> None:
    event = event_for(real, "RTC_CHANGE", 60)
    assert isinstance(event.info, MappingProxyType)
    with pytest.raises(TypeError):
        event.info["utcoffset"] = 0  # type: ignore[index]


def test_domain_event_info_is_a_copy_of_the_callers_dict() -> None:
    info: dict[str, object] = {"utcoffset": 60}
    event = DomainEvent(
        backend=BACKEND,
        event="rtc_change",
        detail=None,
        domain=DOMAIN,
        codes=Codes(event_id=libvirt.VIR_DOMAIN_EVENT_ID_RTC_CHANGE),
        origin="libvirt",
        received_at=RECEIVED_AT,
        info=info,  # type: ignore[arg-type]
    )
    info["utcoffset"] = 0
    assert event.info["utcoffset"] == 60
