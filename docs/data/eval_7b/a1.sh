# RULER-4K throughput, 8B shape: every policy x decode (fast, triton) x batch 8/32, and batch 1, with the hf-generate anchor
source .gpu/setup.sh
R=$OUT/runs; mkdir -p $R
start=$(date +%s)
python3 run.py -m +experiment=throughput_ruler $TOK runs_dir=$R 2>&1 | grep -v "^\[20" | tee $OUT/tp4k.log
echo "[gpu] 4K batch 8/32: $(( $(date +%s) - start )) s"
python3 run.py -m +experiment=throughput_ruler $TOK task.batch_size=1 task.num_samples=2 runs_dir=$R 2>&1 | grep -v "^\[20" | tee $OUT/tp4k_b1.log
echo "[gpu] 4K all: $(( $(date +%s) - start )) s"
tar czf $OUT/records_4k.tgz -C $R records
