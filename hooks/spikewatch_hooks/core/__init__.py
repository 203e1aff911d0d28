"""The machinery every trainer hook shares: the engine, its options, values and commands."""
