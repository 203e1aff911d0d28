"""Stage-1 streaming detectors: O(1) per step, pure, no I/O."""
