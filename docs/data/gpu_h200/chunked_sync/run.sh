#!/bin/bash
set -u
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1
timeout 150 python3 .h7/chunk_sync.py 2>&1 | grep -v -i warn | tee $OUT/chunk_sync.log
tar czf $OUT/records.tgz -C $OUT sync nosync; rm -rf $OUT/sync $OUT/nosync
