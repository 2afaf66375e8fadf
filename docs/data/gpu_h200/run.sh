#!/bin/bash
# Issue 17, second call (nvidia-h200-x2): GPU 0 the 8K decode bench (bound, fused, graph, hf-static);
# GPU 1 the fused bf16 CUDA test, the 32K chunked-prefill rows and the 32K fused rows.
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
chmod +x .h7/bench.sh
CUDA_VISIBLE_DEVICES=0 timeout 245 .h7/bench.sh --contexts 8192 --policies full streamingllm lacache --decode fused graph hf-static --steps 64 > $OUT/bench8k.log 2>&1 &
BENCH=$!
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 75 python3 -m pytest -q -m cuda tests/test_fast_decode.py -k True -p no:cacheprovider -s 2>&1 | grep -E "fast-exact|passed|failed|Error" | head -20
  for c in 512 2048; do timeout 40 .h7/bench.sh --contexts 32768 --policies lacache --decode graph --steps 16 --prefill chunked --chunk $c; done
  timeout 95 .h7/bench.sh --contexts 32768 --policies full lacache --decode fused --steps 64 --profile
) > $OUT/gpu1.log 2>&1
wait $BENCH
tar czf $OUT/records.tgz -C $OUT rb; rm -rf $OUT/rb
cat $OUT/bench8k.log; grep -v "^\[20" $OUT/gpu1.log | grep -v "^ *aten\|^---\|^ *Name\|^ *void\|^ *Self\|triton_\|^ *Memcpy\|^ *cuda\|^ *nvjet\|^ *sm90\|^ *Activity\|^$" | head -40
