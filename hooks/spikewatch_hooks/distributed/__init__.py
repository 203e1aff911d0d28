"""``torch.distributed``: the lockstep collective and sharded (DCP) checkpoints."""
