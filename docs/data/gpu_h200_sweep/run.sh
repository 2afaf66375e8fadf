#!/bin/bash
# Issue 17 on an nvidia-h200-x2: GPU 0 runs the decode bench; GPU 1 the fused CUDA test, the chunked-prefill
# rows and a 1-GPU sweep; then the same sweep over both GPUs (hydra/launcher=joblib_gpus).
set -u
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
nvidia-smi -L; python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.device_count())'
B() { python3 -m lacache.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --budgets 4096 --plot "" --runs-dir $OUT/rb "$@" 2>&1 | grep -v -i warn; }
(
  export CUDA_VISIBLE_DEVICES=0
  timeout 220 B --contexts 8192 --policies full streamingllm lacache --decode fused graph hf-static --steps 64
  timeout 110 B --contexts 32768 --policies full lacache --decode fused --steps 64 --profile
) > $OUT/bench.log 2>&1 &
BENCH=$!
SWEEP="run.py -m model=llama3-8b-shape model.tokenizer=$PWD/.h7/tok task=ruler task.context_length=8192 task.tasks=[niah_single_1] task.num_samples=8 cache=full,streamingllm,lacache cache.decode=fast seed=0,1 progress=false rerun=true"
(
  export CUDA_VISIBLE_DEVICES=1
  timeout 130 python3 -m pytest -q -m cuda tests/test_fast_decode.py -k True -p no:cacheprovider -s 2>&1 | grep -E "fast-exact|passed|failed|Error" | head -20
  for c in 512 2048; do timeout 50 B --contexts 32768 --policies lacache --decode graph --steps 16 --prefill chunked --chunk $c; done
  s=$(date +%s); timeout 160 python3 $SWEEP runs_dir=$OUT/r1 2>&1 | grep -v -i warn; echo "SWEEP1 wall_s $(( $(date +%s) - s ))"
) > $OUT/gpu1.log 2>&1
wait $BENCH
s=$(date +%s); timeout 110 python3 $SWEEP hydra/launcher=joblib_gpus hydra.launcher.n_jobs=2 runs_dir=$OUT/r2 > $OUT/sweep2.log 2>&1; echo "SWEEP2 wall_s $(( $(date +%s) - s ))" >> $OUT/sweep2.log
tar czf $OUT/records.tgz -C $OUT rb r1 r2; rm -rf $OUT/rb $OUT/r1 $OUT/r2
cat $OUT/gpu1.log | grep -v "^\[20\|HYDRA" | tail -25; grep -E "bound|fused|graph|hf-static|Error|rror" $OUT/bench.log | head -30; grep -E "sweep|wall_s|rror" $OUT/sweep2.log
