# RULER-8K throughput (fast path, batch 32) with the anchor, the 128K prompt of every policy, the decode bound 8K-128K
source .gpu/setup.sh
R=/tmp/runs; mkdir -p $R
save() { tar czf $OUT/records.tgz -C $R records; }
start=$(date +%s)
python3 run.py -m +experiment=throughput_ruler $TOK task.context_length=8192 task.batch_size=32 paper.decode=fast runs_dir=$R 2>&1 | grep -v "^\[20" > $OUT/tp8k.log
save; echo "[gpu] 8K: $(( $(date +%s) - start )) s"; grep -c record: $OUT/tp8k.log
python3 -m lacache.harness.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --contexts 131072 --budgets 4096 \
  --policies full streamingllm h2o snapkv tova pyramidkv lacache --decode graph --prefill chunked --chunk 2048 --steps 32 \
  --runs-dir $R --plot "" > $OUT/bench128k.log 2>&1
save; echo "[gpu] 128K: $(( $(date +%s) - start )) s"; tail -9 $OUT/bench128k.log
python3 -m lacache.harness.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --contexts 8192 32768 131072 --budgets 4096 \
  --policies streamingllm lacache --decode triton --prefill chunked --chunk 2048 --steps 64 --runs-dir $R --plot "" > $OUT/bound.log 2>&1
save; echo "[gpu] all: $(( $(date +%s) - start )) s"; tail -8 $OUT/bound.log
