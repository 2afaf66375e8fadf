"""The CUDA tests of lacache.decode.chunk_graphs against a deliberately broken replay (the new chunk's inputs not copied
in): they must fail. Usage, from the repository root on a GPU machine: python docs/data/gpu_h200_chunk_graphs/broken_replay.py"""
import sys
import pytest
import lacache.decode.chunk_graphs as cg

def replay(self, tensors):
    self.graph.replay()
    return self.output

cg.Captured.replay = replay
sys.exit(pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", "tests/test_chunk_graphs.py"]))
