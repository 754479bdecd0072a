"""The public consumer API: what an orchestrator imports to keep the fleet's domains from
virtpub's messages without copying `virtpub inventory`'s rules: `Inventory` holds the rules,
`follow` feeds it from the exchange (the README's "Consuming" shows both)."""

from virtpub.consumer.follow import follow
from virtpub.consumer.inventory import BINDINGS, DEDUP_WINDOW, Inventory, Row

__all__ = ["BINDINGS", "DEDUP_WINDOW", "Inventory", "Row", "follow"]
