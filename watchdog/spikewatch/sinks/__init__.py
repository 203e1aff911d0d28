"""Where decisions and incidents go besides the trainer: Slack (and the event store)."""
