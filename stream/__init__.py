"""The streaming engine: event types, nodes, bounded queues, binning, metrics and shutdown."""
