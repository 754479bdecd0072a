"""The schema contract: schemas/versions.json locks each schema's version and fingerprint.

Consumers pin `dataschema` versions, so a schema must never change without its
`x-virtpub-version` changing with it. The lock makes such a change fail here
until the developer bumps the version and records the new fingerprint.
Samples beside each schema are real messages (generated from the Envelope and
normalize code) that every schema version must keep accepting.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, FormatChecker

from virtpub.contract import schemas

SCHEMA_DIR = schemas.schema_dir()
VERSIONS_FILE = SCHEMA_DIR / "versions.json"
SCHEMA_FILES = sorted(SCHEMA_DIR.glob("*/v*.json"))
SAMPLE_FILES = sorted(SCHEMA_DIR.glob("*/samples/*.json"))


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def lock_problem(name: str, document: dict[str, Any], locked: dict[str, Any]) -> str | None:
    """Why `document` (the latest file of schema `name`) disagrees with versions.json, if it does.

    `locked` is the whole versions.json mapping.
    """
    version = str(document[schemas.VERSION_KEY])
    current = {"version": version, "fingerprint": schemas.fingerprint(document)}
    entry = locked.get(name)
    update = f'update schemas/versions.json: "{name}": {json.dumps(current)}'
    if entry is None:
        return f"{name} is not in schemas/versions.json; {update}"
    if current == entry:
        return None
    if version == entry["version"]:
        return (
            f"schema {name} changed but {schemas.VERSION_KEY} is still {version}: bump it "
            f"(minor for an additive change, major for a breaking one; a major bump is a new "
            f"v<N>.json file beside the old one), then {update}"
        )
    return (
        f"schema {name} is now version {version} but versions.json still says "
        f"{entry['version']}; {update}"
    )


@pytest.fixture(scope="module")
def locked() -> dict[str, Any]:
    return load(VERSIONS_FILE)


def test_schema_files_exist_for_every_schema_name() -> None:
    assert {path.parent.name for path in SCHEMA_FILES} == set(schemas.ALL)


@pytest.mark.parametrize("path", SCHEMA_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_schema_file_is_a_valid_2020_12_schema(path: Path) -> None:
    document = load(path)
    assert document["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(document)


@pytest.mark.parametrize("name", schemas.ALL)
def test_schema_version_matches_its_file_name(name: str) -> None:
    """schemas.info() refuses a v1.json claiming 2.x; this fails first, with the reason."""
    info = schemas.info(name)
    assert info.path.stem == f"v{info.major}"


def test_versions_file_covers_exactly_the_known_schemas(locked: dict[str, Any]) -> None:
    assert set(locked) == set(schemas.ALL)


@pytest.mark.parametrize("name", schemas.ALL)
def test_schema_matches_its_locked_version_and_fingerprint(
    name: str, locked: dict[str, Any]
) -> None:
    problem = lock_problem(name, schemas.info(name).load(), locked)
    assert problem is None, problem


@pytest.mark.parametrize("name", schemas.ALL)
def test_schema_has_samples(name: str) -> None:
    samples = SCHEMA_DIR / name / "samples"
    assert samples.is_dir(), f"add {samples} with at least one sample message"
    assert sorted(samples.glob("*.json")), f"add at least one sample message to {samples}"


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: f"{p.parent.parent.name}/{p.name}")
def test_sample_validates_against_the_latest_schema(path: Path) -> None:
    name = path.parent.parent.name
    validator = Draft202012Validator(schemas.info(name).load(), format_checker=FormatChecker())
    sample = load(path)
    validator.validate(sample)
    assert sample["dataschema"].startswith(f"urn:virtpub:schema:{name}:")


# --- the lock bites ---------------------------------------------------------------------------


def next_minor(version: str) -> str:
    major, minor = version.split(".")
    return f"{major}.{int(minor) + 1}"


BUMPED = next_minor(schemas.info(schemas.DOMAIN_EVENT).version)


@pytest.fixture
def mutated() -> dict[str, Any]:
    """The domain-event schema with an extra optional property: an additive change."""
    document = copy.deepcopy(schemas.info(schemas.DOMAIN_EVENT).load())
    document["$defs"]["data"]["properties"]["tenant"] = {"type": "string"}
    return document


def test_changed_schema_with_unchanged_version_asks_for_a_bump(
    mutated: dict[str, Any], locked: dict[str, Any]
) -> None:
    problem = lock_problem(schemas.DOMAIN_EVENT, mutated, locked)
    assert problem is not None
    assert "bump it" in problem
    assert schemas.VERSION_KEY in problem
    assert "versions.json" in problem


def test_bumped_schema_with_stale_versions_file_asks_to_update_it(
    mutated: dict[str, Any], locked: dict[str, Any]
) -> None:
    mutated[schemas.VERSION_KEY] = BUMPED
    problem = lock_problem(schemas.DOMAIN_EVENT, mutated, locked)
    assert problem is not None
    assert "bump it" not in problem
    assert "update schemas/versions.json" in problem
    assert f'"version": "{BUMPED}"' in problem
    assert schemas.fingerprint(mutated) in problem


def test_bump_recorded_in_versions_file_is_accepted(
    mutated: dict[str, Any], locked: dict[str, Any]
) -> None:
    mutated[schemas.VERSION_KEY] = BUMPED
    relocked = {
        **locked,
        schemas.DOMAIN_EVENT: {"version": BUMPED, "fingerprint": schemas.fingerprint(mutated)},
    }
    assert lock_problem(schemas.DOMAIN_EVENT, mutated, relocked) is None


def test_schema_missing_from_versions_file_is_reported() -> None:
    document = schemas.info(schemas.DOMAIN_EVENT).load()
    problem = lock_problem(schemas.DOMAIN_EVENT, document, {})
    assert problem is not None
    assert "not in schemas/versions.json" in problem


def test_fingerprint_ignores_only_the_version_key() -> None:
    document = schemas.info(schemas.DOMAIN_EVENT).load()
    bumped = {**document, schemas.VERSION_KEY: "1.9"}
    retitled = {**document, "title": "something else"}
    assert schemas.fingerprint(bumped) == schemas.fingerprint(document)
    assert schemas.fingerprint(retitled) != schemas.fingerprint(document)


def test_the_readme_lists_every_schema_at_its_version() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for name in schemas.ALL:
        row = f"| `{name}` | {schemas.info(name).version} |"
        assert row in readme, f"README: update the schema table row for {name}"
