"""examples/train_moe_distributed.py runs in 2 gloo processes (a few steps), with MPO and dense experts."""

from __future__ import annotations

import sys
from pathlib import Path

from ._dist import run_distributed

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _worker(rank: int, world: int, argv: list[str]) -> None:
    sys.path.insert(0, str(EXAMPLES))
    import train_moe_distributed

    result = train_moe_distributed.main(argv)
    assert result["last_loss"] < result["first_loss"], result


def test_example_trains_mpoe_with_expert_parallelism_and_ddp() -> None:
    run_distributed(_worker, 2, ["--steps", "8", "--batch-size", "8", "--log-every", "4"], timeout=120)


def test_example_trains_switch_with_capacity_and_top2() -> None:
    argv = ["--steps", "8", "--batch-size", "8", "--kind", "dense", "--k", "2", "--capacity-factor", "1.0"]
    run_distributed(_worker, 2, argv, timeout=120)
