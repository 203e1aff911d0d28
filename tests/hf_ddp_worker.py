"""One rank of a 2-process HF ``Trainer`` run (started by ``torchrun`` in the tests).

Usage: torchrun --nproc_per_node=2 tests/hf_ddp_worker.py OUT_DIR [MONITOR_URL]
Each rank writes ``rank{N}.json`` with its guard's stats and whether the ranks' parameters
are bit-identical at the end.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist

from hf_scenario import SCENARIO, guard_for, train
from spikewatch_hooks.adapters.hf import SpikewatchCallback
from spikewatch_hooks.demo.corpus import CharCorpus, corpus_text


def main() -> None:
    out, url = Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(1)
    # Two ranks share the data (a rank sees every other batch): one epoch must hold the
    # 160 steps and the batches a rollback skips, or the poison comes round again.
    s = replace(SCENARIO, steps=160, poison_start=120, poison_batches=20, spare_batches=320)
    corpus = CharCorpus(corpus_text(200_000))
    callback = guard_for(s)
    if url is not None:  # the same options, reporting to a service (rank 0 only)
        callback = SpikewatchCallback(
            run_id="hf-ddp", config=callback.options.config, snapshot_every=10,
            keep_snapshots=8, monitor_url=url, token=os.environ["SPIKEWATCH_TOKEN"],
        )  # fmt: skip
    model, _, _ = train(corpus, out, s, poison=True, callback=callback, ddp_backend="gloo")
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    stats = callback.stats
    result = {
        "rollbacks": stats["rollbacks"],
        "ledger": stats["skip_ledger"],
        "step_count": callback.engine.step_count,
        "lockstep": callback.engine.lockstep is not None,
        "identical": all(torch.equal(gathered[0], g) for g in gathered[1:]),
    }
    Path(out, f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    os._exit(0)  # gloo's threads can abort an interpreter teardown around them
