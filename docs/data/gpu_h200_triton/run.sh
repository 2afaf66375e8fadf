#!/bin/bash
# As run on 2026-12-01 (code 1d03ce2), after .gpu-style setup (wheels + model parts, docs/RESULTS.md);
# the RULER-8K line was run again by hand with the ++ overrides below (the sweep base config is the
# default cache, which has no budget: plain cache.budget= failed). Records: records/, logs: logs/.
# Session 7 GPU run (one H200; the 2-GPU kind was not lent), after setup.sh: next.sh OUT_DIR
# A (alone on the GPU): the Triton kernels' CUDA tests and a deliberately broken kernel; the 8K decode
#   bench (bound, hf-static, fused, triton rows in one process).
# B: the fidelity study's last points (6 NIAH, 3 RULER-4K).
# C (alone): RULER-8K samples/min of the eviction policies; chunked prefill at 32K; 32K triton decode.
set -u
O=$1; R=/tmp/study; mkdir -p $O $R/records $R/logs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
for f in docs/data/fidelity/records/*.json.gz; do gunzip -c $f > $R/records/$(basename $f .gz); done
echo "[next] start $(date +%T)" >> $O/phases.txt
printf '#!/bin/bash\npython3 -m lacache.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --budgets 4096 --plot "" "$@" 2>&1 | grep -v -i warn\n' > /tmp/B; chmod +x /tmp/B
{
  [ -n "${SKIP_TESTS:-}" ] || {
  timeout 300 python3 -m pytest -q -m cuda tests/test_fast_decode.py -k "triton or True" -p no:cacheprovider -s 2>&1 | grep -E "fast-exact|passed|failed|Error|assert" | head -30
  echo "== broken kernel (tail/compacted scores swapped): the kernel test must fail"
  rm -rf /tmp/broken && mkdir /tmp/broken && cp -r lacache baselines tasks tests configs pyproject.toml /tmp/broken/
  sed -i 's/tl.where(tail\[None, :\], s_tail, s_compact)/tl.where(tail[None, :], s_compact, s_tail)/' /tmp/broken/lacache/triton_decode.py
  grep -c "s_compact, s_tail" /tmp/broken/lacache/triton_decode.py
  (cd /tmp/broken && PYTHONPATH=/tmp/site:/tmp/broken timeout 120 python3 -m pytest -q -m cuda tests/test_fast_decode.py -k "triton_kernels" -p no:cacheprovider 2>&1 | tail -3)
  echo "[next] tests done $(date +%T)" >> $O/phases.txt
  }
  timeout 420 /tmp/B --contexts 8192 --policies full streamingllm lacache --decode fused triton hf-static --steps 64 --runs-dir $O/rb8k
  echo "[next] bench8k done $(date +%T)" >> $O/phases.txt
} >> $O/a.log 2>&1
python3 run.py -m +experiment=fidelity_niah runs_dir=$R hydra/launcher=joblib_gpus workers_per_gpu=2 hydra.launcher.n_jobs=2 hydra.sweep.dir=$R/.hydra/niah > $R/logs/niah2.log 2>&1
echo "[next] niah done $(date +%T)" >> $O/phases.txt
python3 run.py -m +experiment=fidelity_ruler task.context_length=4096 runs_dir=$R hydra/launcher=joblib_gpus workers_per_gpu=3 hydra.launcher.n_jobs=3 hydra.sweep.dir=$R/.hydra/r4 > $R/logs/ruler4k2.log 2>&1
echo "[next] fidelity done $(date +%T)" >> $O/phases.txt
{
  s=$(date +%s); timeout 300 python3 run.py -m model=llama3-8b-shape model.tokenizer=$PWD/.h7/tok task=ruler task.context_length=8192 task.tasks=[niah_single_1] task.num_samples=8 cache=h2o,tova,snapkv,pyramidkv ++cache.budget=256 ++cache.decode=fast progress=false rerun=true runs_dir=$O/r8k 2>&1 | grep -v -i warn | tail -30; echo "RULER8K wall_s $(( $(date +%s) - s ))"
  echo "[next] ruler8k done $(date +%T)" >> $O/phases.txt
  timeout 90 /tmp/B --contexts 32768 --policies lacache --decode graph --steps 16 --runs-dir $O/rbc
  for c in 512 2048; do timeout 90 /tmp/B --contexts 32768 --policies lacache --decode graph --steps 16 --prefill chunked --chunk $c --runs-dir $O/rbc; done
  echo "[next] chunked done $(date +%T)" >> $O/phases.txt
  timeout 240 /tmp/B --contexts 32768 --policies full streamingllm lacache --decode triton --steps 64 --profile --runs-dir $O/rb32k
  echo "[next] all done $(date +%T)" >> $O/phases.txt
} > $O/c.log 2>&1
