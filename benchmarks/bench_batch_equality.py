"""How often continuous batching changes a greedy token, exact mode against fast mode.

Random workloads (request count, prompt and output lengths, pool size and block size
drawn per workload, pools small enough to preempt) are served by the scheduler and
compared, request by request, with ``Model.generate`` alone.

    python benchmarks/bench_batch_equality.py              # 4 workloads x 150 requests
    python benchmarks/bench_batch_equality.py --workloads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from engine.model import Model, ModelConfig
from engine.scheduler import Scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=150)
    args = parser.parse_args()
    config = ModelConfig(512, 64, 2, 2, 600)
    print(f"model {config.n_layers} layers x {config.d_model}, vocab {config.vocab_size}\n")
    print("| mode | requests | new tokens | preemptions | requests differing from solo | seconds |")
    print("|---|---:|---:|---:|---:|---:|")
    for invariant in (True, False):
        requests = tokens = preemptions = differing = 0
        start = time.perf_counter()
        for seed in range(args.workloads):
            model = Model(config, seed=seed)
            rng = np.random.default_rng(seed)
            prompts = [
                [int(t) for t in rng.integers(0, config.vocab_size, rng.integers(1, 100))]
                for _ in range(args.requests)
            ]
            counts = [int(n) for n in rng.integers(1, 150, args.requests)]
            solo = [model.generate(p, n) for p, n in zip(prompts, counts, strict=True)]
            scheduler = Scheduler(
                model,
                num_blocks=int(rng.integers(20, 200)),
                block_size=int(rng.choice([1, 4, 16])),
                batch_invariant=invariant,
            )
            for prompt, count in zip(prompts, counts, strict=True):
                scheduler.add(prompt, count)
            out = scheduler.run()
            requests += len(out)
            tokens += sum(counts)
            preemptions += scheduler.stats.preemptions
            differing += sum(a != b for a, b in zip(out, solo, strict=True))
            assert scheduler.cache.num_free_blocks == scheduler.cache.num_blocks
        mode = "batch-invariant (default)" if invariant else "batched matmuls"
        print(
            f"| {mode} | {requests} | {tokens} | {preemptions} | {differing} "
            f"| {time.perf_counter() - start:.0f} |"
        )


if __name__ == "__main__":
    main()
