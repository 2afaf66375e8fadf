"""The GPU decoders: the exact caches' decode converted to a no-copy ring (:mod:`.fast`, :mod:`.eviction`),
its kernels (:mod:`.kernels`, :mod:`.fused`, :mod:`.triton_kernels`), and the chunked prefill's CUDA graphs
and grouped attention (:mod:`.chunk_graphs`, :mod:`.grouped_attention`). docs/PERFORMANCE.md has the design."""
