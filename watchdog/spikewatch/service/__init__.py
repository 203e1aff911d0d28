"""The monitor service: HTTP API, event store, scheduler and exporter around `Monitor`."""
