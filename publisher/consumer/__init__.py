"""The public consumer API: what an orchestrator imports to keep the fleet's domains from
virtpub's messages without copying `virtpub inventory`'s rules."""

from virtpub.consumer.inventory import BINDINGS, DEDUP_WINDOW, Inventory, Row

__all__ = ["BINDINGS", "DEDUP_WINDOW", "Inventory", "Row"]
