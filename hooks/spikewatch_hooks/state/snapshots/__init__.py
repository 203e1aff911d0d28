"""The in-memory snapshot ring: what a slot holds (`plan`), where (`buffers`, `slot`),
split across DDP ranks or not (`split`), within a host-memory cap (`budget`), and the
ring itself (`ring.SnapshotRing`: take, restore in place). Nothing is imported here, so
`distributed.split_ring` can import `plan` without the ring that imports it."""
