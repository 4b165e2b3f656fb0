"""Dense-twin A/B of the `dense_speedup_ratio` gauge: `moe-reuse dense-ab` (see its --help).

    python benchmarks/dense_twin_ab.py --model big-moe --levels 1,2,4,8,16,32,64
"""

from moe_reuse.plugin.harness.dense_ab import main

if __name__ == "__main__":
    raise SystemExit(main())
