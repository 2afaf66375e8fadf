# Gemma 3 270M fidelity study (exact decode path): the ceiling run, then RULER 2K/4K at 50% and 25%, both compress modes
source .gpu/setup.sh
export LACACHE_CACHE=/tmp/lc
G=$LACACHE_CACHE/gguf/gemma3-270m; mkdir -p $G; cat /tmp/parts/part_0* > $G/gemma-3-270m-q4_k_m.gguf && rm -rf /tmp/parts
sha256sum $G/gemma-3-270m-q4_k_m.gguf | cut -c1-16
R=/tmp/runs; mkdir -p $R; START=$(date +%s); END=$((START + ${BUDGET:-400}))
save() { tar czf $OUT/records.tgz -C $R records; }
sweep() { left=$((END - $(date +%s))); [ $left -gt 20 ] || return 1; echo "[gpu] $1 ($left s left)"; shift
  timeout $left python3 run.py -m +experiment=fidelity_gemma3 runs_dir=$R task.fill=exact "$@" 2>&1 | grep -E "ruler/avg|skipped|failed|sweep|Error|error" | grep -v "^\[20" >> $OUT/study.log; save; }
CAND="task.tasks=[niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multiquery,niah_multivalue]"
sweep ceiling2k +experiment/policy=full paper.budget=0.5 task.compress=prompt "$CAND"
sweep ceiling4k +experiment/policy=full paper.budget=0.5 task.compress=prompt "$CAND" task.context_length=4096
TASKS=$(python3 -c "
import json,glob
s={}
for f in glob.glob('$R/records/*.json'):
    r=json.load(open(f)); m=r.get('metrics',{})
    for k,v in m.items():
        if k.startswith('ruler/') and k!='ruler/avg': s.setdefault(k[6:],[]).append(v)
ok=[t for t,v in s.items() if len(v)==2 and min(v)>=30]
print(','.join(sorted(ok)) or 'niah_single_1,niah_multikey_1')")
echo "[gpu] ceiling: tasks $TASKS" | tee -a $OUT/study.log
for len in 2048 4096; do sweep "$len 50%" paper.budget=0.5 task.context_length=$len "task.tasks=[$TASKS]"; done
for len in 2048 4096; do sweep "$len 25%" paper.budget=0.25 task.context_length=$len "task.tasks=[$TASKS]"; done
echo "[gpu] done: $(( $(date +%s) - START )) s"; ls $R/records | wc -l
