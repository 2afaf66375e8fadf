"""Chunked prefill at 32K with and without the per-layer host sync in RotaryTable.unrotate_at (one process, GPU 0)."""
import os
import sys

from lacache import kvcache
from lacache.harness import bench

original = kvcache.RotaryTable.unrotate_at


def unrotate_at_no_sync(self, x, positions):
    self._ensure(40000)  # tables sized once on the host: no int(positions.max()) per layer
    index = positions.long()
    return kvcache.rotate(x.float(), self.ucos32[index], -self.usin32[index]).to(self.dtype)


common = ["--model", "llama3-8b-shape", "--device", "cuda", "--dtype", "bfloat16", "--budgets", "4096", "--plot", "",
          "--contexts", "32768", "--policies", "lacache", "--decode", "graph", "--steps", "8"]
for mode in ("sync", "nosync"):
    kvcache.RotaryTable.unrotate_at = original if mode == "sync" else unrotate_at_no_sync
    for prefill in (["full"], ["chunked", "--chunk", "512"], ["chunked", "--chunk", "2048"]):
        if mode == "nosync" and prefill == ["full"]:
            continue
        print(f"== {mode} prefill {' '.join(prefill)}", flush=True)
        bench.main(common + ["--prefill", *prefill, "--runs-dir", os.path.join(os.environ["OUT"], mode)])
