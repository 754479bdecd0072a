"""The config parsers on their own: real configs, hostile ones, and fuzzed bytes."""

from __future__ import annotations

import re
from xml.sax.saxutils import escape

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtpub.drivers.files.config_files import (
    MAX_BYTES,
    SUFFIXES,
    Format,
    ParsedConfig,
    Rejection,
    is_format,
    parse,
    watched,
)

UUID = "6f1c6a52-3d0e-4b8a-9a43-1f0e2f7f6a11"
CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

LIBVIRT_XML = b"""<!--
WARNING: THIS IS AN AUTO-GENERATED FILE. CHANGES TO IT ARE LIKELY TO BE
OVERWRITTEN AND LOST. Changes to this xml configuration should be made using:
  virsh edit web-01
-->

<domain type='kvm'>
  <name>web-01</name>
  <uuid>6F1C6A52-3D0E-4B8A-9A43-1F0E2F7F6A11</uuid>
  <metadata>
    <app:owner xmlns:app="http://example.org/app">team &amp; co</app:owner>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-8.2'>hvm</type>
  </os>
  <devices>
    <disk type='file' device='disk'>
      <source file='/var/lib/libvirt/images/web-01.qcow2'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""

XL_CFG = b"""# =====================================================================
# Example PV guest, name = "not-this-one"
# =====================================================================
name = "web-01"   # the domain's name
uuid = '6f1c6a523d0e4b8a9a431f0e2f7f6a11'
type = "pv"; memory = 1024 ; vcpus = 2
kernel = "/boot/vmlinuz"
extra = "root=/dev/xvda1 console=hvc0 # not a comment"
disk = [ 'format=raw, vdev=xvda, access=rw, target=/dev/vg/web-01',
         'format=raw, vdev=xvdb, access=ro, devtype=cdrom, target=/srv/iso/name.iso' ]
vif = [ "mac=00:16:3e:00:00:01,bridge=xenbr0" ]
on_crash = 'restart'
"""


# -- libvirt XML ----------------------------------------------------------------------------


def test_libvirt_xml_gives_name_and_canonical_uuid() -> None:
    assert parse("libvirt-xml", LIBVIRT_XML) == ParsedConfig("web-01", UUID)


def test_libvirt_xml_without_uuid_falls_back_to_the_name() -> None:
    assert parse("libvirt-xml", b"<domain><name>db</name></domain>") == ParsedConfig("db", None)


def test_declared_encoding_is_ignored_for_utf8_content() -> None:
    data = '<?xml version="1.0" encoding="rot13"?><domain><name>café</name></domain>'
    assert parse("libvirt-xml", data.encode()) == ParsedConfig("café", None)


XML_REJECTIONS = {
    "unclosed": (b"<domain><name>a</name>", "malformed"),
    "empty": (b"", "malformed"),
    "text": (b"name = 'a'\n", "malformed"),
    "undefined entity": (b"<domain><name>&a;</name></domain>", "malformed"),
    "dtd": (b"<!DOCTYPE domain><domain><name>a</name></domain>", "forbidden_xml"),
    "billion laughs": (
        b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
        b'<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
        b'<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>'
        b"<domain><name>&lol3;</name></domain>",
        "forbidden_xml",
    ),
    "external entity": (
        b'<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><name>&x;</name></domain>',
        "forbidden_xml",
    ),
    "network": (b"<network><name>default</name></network>", "not_a_domain"),
    "namespaced root": (b'<domain xmlns="urn:x"><name>a</name></domain>', "not_a_domain"),
    "no name": (b"<domain><uuid>" + UUID.encode() + b"</uuid></domain>", "missing_name"),
    "blank name": (b"<domain><name>  </name></domain>", "missing_name"),
    "control in name": (b"<domain><name>a&#x85;b</name></domain>", "bad_name"),
    "long name": (b"<domain><name>" + b"n" * 1025 + b"</name></domain>", "bad_name"),
    "bad uuid": (b"<domain><name>a</name><uuid>not-a-uuid</uuid></domain>", "bad_uuid"),
    "empty uuid": (b"<domain><name>a</name><uuid/></domain>", "bad_uuid"),
    "nil uuid": (
        b"<domain><name>a</name><uuid>00000000-0000-0000-0000-000000000000</uuid></domain>",
        "bad_uuid",
    ),
    "nul": (b"<domain><name>a</name>\0</domain>", "binary"),
    "latin-1": (b"<domain><name>caf\xe9</name></domain>", "binary"),
    "utf-16": ("<domain><name>a</name></domain>".encode("utf-16"), "binary"),
}


@pytest.mark.parametrize("case", sorted(XML_REJECTIONS))
def test_libvirt_xml_rejections(case: str) -> None:
    data, reason = XML_REJECTIONS[case]
    result = parse("libvirt-xml", data)
    assert isinstance(result, Rejection), result
    assert result.reason == reason
    assert "\n" not in result.message


def test_rejection_messages_do_not_quote_the_file() -> None:
    secret = b"hunter2-secret"
    for data in (b"<domain><name>" + secret, b"name = '" + secret + b"\n"):
        for fmt in SUFFIXES:
            result = parse(fmt, data)
            assert isinstance(result, Rejection)
            assert "hunter2" not in result.message


def test_size_limit_is_checked_again_by_the_parser() -> None:
    big = b"<domain><name>a</name>" + b" " * MAX_BYTES + b"</domain>"
    result = parse("libvirt-xml", big)
    assert isinstance(result, Rejection) and result.reason == "too_large"
    exact = b"<domain><name>a</name></domain>".ljust(MAX_BYTES, b" ")
    assert parse("libvirt-xml", exact) == ParsedConfig("a", None)


# -- xl -------------------------------------------------------------------------------------


def test_xl_gives_name_and_canonical_uuid() -> None:
    assert parse("xl", XL_CFG) == ParsedConfig("web-01", UUID)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name='a'", ParsedConfig("a", None)),
        ('  name  =  "a b"  ;  ', ParsedConfig("a b", None)),
        ("name = 'it''s'", None),
        ('name = "a#b" # comment \'x', ParsedConfig("a#b", None)),
        ("name = 'a;b'; uuid = \"" + UUID.upper() + '"', ParsedConfig("a;b", UUID)),
        ("# name = 'old'\nname = 'new'", ParsedConfig("new", None)),
        ("name = 'a'\r\nuuid = '{" + UUID + "}'\r\n", ParsedConfig("a", UUID)),
        ("hostname = 'x'\nname = 'a'\nuuidx = 'y'", ParsedConfig("a", None)),
    ],
)
def test_xl_syntax(text: str, expected: ParsedConfig | None) -> None:
    result = parse("xl", text.encode())
    if expected is None:
        assert isinstance(result, Rejection)
    else:
        assert result == expected


XL_REJECTIONS = {
    "unquoted": ("name = web\n", "malformed"),
    "unterminated": ("name = 'web\n", "malformed"),
    "escape": ('name = "we\\"b"\n', "malformed"),
    "list": ("name = [ 'a' ]\n", "malformed"),
    "twice": ("name = 'a'\nname = 'b'\n", "malformed"),
    "uuid twice": ("name = 'a'\nuuid = '" + UUID + "'\nuuid = '" + UUID + "'\n", "malformed"),
    "commented out": ("# name = 'a'\nmemory = 512\n", "missing_name"),
    "empty name": ("name = ''\n", "missing_name"),
    "tab in name": ("name = 'a\tb'\n", "bad_name"),
    "bad uuid": ("name = 'a'\nuuid = '1234'\n", "bad_uuid"),
    "max uuid": ("name = 'a'\nuuid = 'ffffffff-ffff-ffff-ffff-ffffffffffff'\n", "bad_uuid"),
    "empty": ("", "missing_name"),
}


@pytest.mark.parametrize("case", sorted(XL_REJECTIONS))
def test_xl_rejections(case: str) -> None:
    text, reason = XL_REJECTIONS[case]
    result = parse("xl", text.encode())
    assert isinstance(result, Rejection), result
    assert result.reason == reason


def test_xl_binary_and_size() -> None:
    assert parse("xl", b"name = 'a'\0") == Rejection("binary", "contains NUL bytes")
    not_utf8 = parse("xl", b"name = '\xff'")
    assert isinstance(not_utf8, Rejection) and not_utf8.reason == "binary"
    too_large = parse("xl", b"#" * (MAX_BYTES + 1))
    assert isinstance(too_large, Rejection) and too_large.reason == "too_large"


# -- watched names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name", "expected"),
    [
        ("libvirt-xml", "web-01.xml", True),
        ("libvirt-xml", "x.xml", True),
        ("libvirt-xml", ".xml", False),
        ("libvirt-xml", "web-01.xml~", False),
        ("libvirt-xml", ".web-01.xml.swp", False),
        ("libvirt-xml", ".web-01.xml.swx", False),
        ("libvirt-xml", "4913", False),
        ("libvirt-xml", "#web-01.xml#", False),
        ("libvirt-xml", "#web-01.xml", False),
        ("libvirt-xml", ".#web-01.xml", False),
        ("libvirt-xml", ".web-01.xml", False),
        ("libvirt-xml", ".web-01.xml.tmp", False),
        ("libvirt-xml", "web-01.xml.tmp", False),
        ("libvirt-xml", "web-01.xml.new", False),
        ("libvirt-xml", "web-01.XML", False),
        ("libvirt-xml", "web-01.cfg", False),
        ("libvirt-xml", "bad-\udcff.xml", False),
        ("xl", "web-01.cfg", True),
        ("xl", "web-01.cfg~", False),
        ("xl", ".web-01.cfg.swp", False),
        ("xl", "xl.conf", False),
        ("xl", "web-01.xml", False),
        ("xl", "xlexample.hvm", False),
    ],
)
def test_watched(fmt: Format, name: str, expected: bool) -> None:
    assert watched(fmt, name) is expected


def test_is_format() -> None:
    assert is_format("libvirt-xml") and is_format("xl")
    assert not is_format("xml") and not is_format("")


# -- fuzzing ----------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow],
)
FORMATS: list[Format] = ["libvirt-xml", "xl"]
DECLARED = b'<?xml version="1.0" encoding="UTF-8"?><domain><name>a</name></domain>'
SAMPLES = [LIBVIRT_XML, XL_CFG, DECLARED, XML_REJECTIONS["billion laughs"][0]]


def _well_formed(result: ParsedConfig | Rejection) -> None:
    assert isinstance(result, ParsedConfig | Rejection)
    if isinstance(result, ParsedConfig):
        assert result.name.strip() and result.name.isprintable()
        assert result.uuid is None or CANONICAL.fullmatch(result.uuid)
    else:
        assert result.message and "\n" not in result.message


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=st.binary(max_size=2048))
def test_random_bytes_never_raise(fmt: Format, data: bytes) -> None:
    _well_formed(parse(fmt, data))


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real config with a few bytes flipped, inserted, deleted or the file cut short."""
    data = bytearray(draw(st.sampled_from(SAMPLES)))
    for _ in range(draw(st.integers(1, 8))):
        where = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "splice"]))
        if action == "flip" and where < len(data):
            data[where] = draw(st.integers(0, 255))
        elif action == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        elif action == "delete":
            del data[where : where + draw(st.integers(1, 32))]
        elif action == "truncate":
            del data[where:]
        elif action == "splice":
            token = draw(st.sampled_from([b"<", b">", b"'", b'"', b"#", b";", b"=", b"&lol;"]))
            data[where:where] = token
    return bytes(data)


@FUZZ
@given(fmt=st.sampled_from(FORMATS), data=mutated())
def test_mutated_configs_never_raise(fmt: Format, data: bytes) -> None:
    _well_formed(parse(fmt, data))


NAMES = st.text(
    st.characters(codec="utf-8").filter(lambda c: c.isprintable() and c not in "'\"\\"),
    min_size=1,
    max_size=40,
).filter(str.strip)


@FUZZ
@given(name=NAMES, uuid=st.uuids(version=4))
def test_any_printable_name_round_trips(name: str, uuid: object) -> None:
    xml = f"<domain><name>{escape(name)}</name><uuid>{uuid}</uuid></domain>".encode()
    assert parse("libvirt-xml", xml) == ParsedConfig(name, str(uuid))
    cfg = f"name = \"{name}\"\nuuid = '{str(uuid).upper()}'\n".encode()
    assert parse("xl", cfg) == ParsedConfig(name, str(uuid))
