#!/bin/bash
python3 -m lacache.bench --model llama3-8b-shape --device cuda --dtype bfloat16 --budgets 4096 --plot "" --runs-dir $OUT/rb "$@" 2>&1 | grep -v -i warn
