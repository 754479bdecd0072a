"""virtpub: hypervisor host events as versioned CloudEvents on a RabbitMQ topic exchange."""

__version__ = "0.1.0"
