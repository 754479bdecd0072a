"""The wire contract: what virtpub publishes, as types.

Every message a consumer can receive is one class here, with its schema name, version and
changelog; `Envelope` wraps one in a CloudEvent with its routing key and AMQP properties.
"""

from virtpub.contract.envelope import Envelope, OutgoingMessage
from virtpub.contract.messages import (
    MESSAGES,
    Backend,
    Capabilities,
    ConfigInvalid,
    DomainEventMessage,
    DomainPart,
    Dropped,
    Message,
    Rename,
    Snapshot,
    for_schema,
)
from virtpub.contract.routing import RoutingKey
from virtpub.contract.schemas import ALL as SCHEMA_NAMES
from virtpub.contract.schemas import SchemaInfo, fingerprint
from virtpub.contract.schemas import info as schema_info

__all__ = [
    "MESSAGES",
    "SCHEMA_NAMES",
    "Backend",
    "Capabilities",
    "ConfigInvalid",
    "DomainEventMessage",
    "DomainPart",
    "Dropped",
    "Envelope",
    "Message",
    "OutgoingMessage",
    "Rename",
    "RoutingKey",
    "SchemaInfo",
    "Snapshot",
    "fingerprint",
    "for_schema",
    "schema_info",
]
