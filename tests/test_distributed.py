"""Sharded evaluation: each rank works on its share of the items and every rank gets all results."""

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from posttrain.distributed import map_sharded, shard, sum_dataclass, unshard
from posttrain.types import Totals


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("total", [0, 1, 2, 5, 7, 8])
def test_shard_and_unshard_round_trip(total, world):
    items = [f"x{i}" for i in range(total)]
    parts = [shard(items, r, world) for r in range(world)]
    need = -(-total // world)
    assert [len(p) for p in parts] == [need] * world  # equal counts: ZeRO-3 ranks stay in step
    assert unshard(parts, total) == items
    assert sorted({x for p in parts for x in p}) == sorted(items)  # pads are copies, never new items


def test_shard_pads_with_the_last_item():
    assert shard(list("abcde"), 0, 2) == ["a", "c", "e"]
    assert shard(list("abcde"), 1, 2) == ["b", "d", "e"]
    assert shard(["a"], 2, 3) == ["a"]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    seen = []

    def fn(part):
        seen.extend(part)
        return [x * 10 for x in part]

    got = map_sharded(fn, list(range(5)))
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"seen": seen, "got": got}, f)
    dist.barrier()
    dist.destroy_process_group()


def test_map_sharded_over_two_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"out.{r}").read_text()) for r in (0, 1))
    assert r0["seen"] == [0, 2, 4] and r1["seen"] == [1, 3, 4]  # rank 1 pads with the last item
    assert r0["got"] == r1["got"] == [0, 10, 20, 30, 40]


def test_map_sharded_in_one_process_is_a_plain_call():
    assert map_sharded(lambda part: [len(part)] * len(part), [1, 2, 3]) == [3, 3, 3]


def _totals_worker(rank: int, world: int, store: str, out: str, max_lens: list) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    mine = Totals(seqs=2.0 + rank, tokens=10.0 * (rank + 1), rl_seqs=1.0, rl_tokens=5.0, sft_seqs=1.0 + rank,
                  sft_tokens=4.0, max_len=max_lens[rank], micro_batches=1 + rank,
                  prompts=3.0 + rank, rl_prompts=1.0, sft_prompts=1.0 + rank)
    try:
        got = {"ok": vars(sum_dataclass(mine))}
    except RuntimeError as e:
        got = {"error": str(e)}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(got, f)
    dist.barrier()
    dist.destroy_process_group()


def test_totals_are_summed_over_ranks_but_max_len_is_not(tmp_path):
    """Mini-batch normalisers add up over ranks; L_max (Dr.GRPO's Σ/(n·L_max)) is a constant: were
    it summed, every token-sum-norm loss would shrink by the number of processes."""
    mp.spawn(_totals_worker, args=(2, str(tmp_path / "s1"), str(tmp_path / "a"), [16.0, 16.0]), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"a.{r}").read_text())["ok"] for r in (0, 1))
    assert r0 == r1 == {"seqs": 5.0, "tokens": 30.0, "rl_seqs": 2.0, "rl_tokens": 10.0, "sft_seqs": 3.0,
                        "sft_tokens": 8.0, "max_len": 16.0, "micro_batches": 3,
                        "prompts": 7.0, "rl_prompts": 2.0, "sft_prompts": 3.0}
    mp.spawn(_totals_worker, args=(2, str(tmp_path / "s2"), str(tmp_path / "b"), [16.0, 32.0]), nprocs=2)
    err = json.loads((tmp_path / "b.0").read_text())["error"]
    assert err == "Totals.max_len must be the same on every rank, got 16.0 … 32.0"


def test_launch_module_is_the_command_line_for_the_deepspeed_launcher():
    import subprocess
    import sys

    # The DeepSpeed launcher appends --local_rank; python -m posttrain.launch drops it and runs the CLI.
    out = subprocess.run([sys.executable, "-m", "posttrain.launch", "--local_rank=0", "ls"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "grpo" in out.stdout and "dapo" in out.stdout
