"""Signal sources. Each turns what a host does into immutable events; none knows about AMQP."""
