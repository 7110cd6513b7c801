# Sourced by the small-default GPU scripts (from the repo root, after bench/device_env.sh): builds
# the tiny ImageBind and the small default (SmolLM2-135M-Instruct converted from its GGUF) unless
# already built. The GGUF: GGUF=FILE, or its parts in build/gguf_parts/part_* (the builder checks
# the sha256 of the joined file).
python3 -m toollmm.tiny
if ! python3 -c "import sys; from pathlib import Path; from toollmm.small import LLM_DIR, is_built; sys.exit(not is_built(Path(LLM_DIR)))"; then
  gguf=${GGUF:-}
  if [ -z "$gguf" ]; then
    gguf=/tmp/SmolLM2-135M-Instruct.Q4_1.gguf
    cat build/gguf_parts/part_* > "$gguf"
  fi
  python3 -m toollmm.small --gguf "$gguf"
fi
