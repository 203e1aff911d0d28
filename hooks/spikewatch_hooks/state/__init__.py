"""Training state kept by the guard: the snapshot ring, RNG state, skip ledger, checkpoints."""
