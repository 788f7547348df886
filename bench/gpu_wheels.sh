#!/usr/bin/env bash
# Wheels for what the GPU machine's image lacks (Python 3.12 there), into .whl/ at the repository root,
# carried with `run(..., carry=[".whl"])`; bench/gpu_suite.sh installs them. Run here, before the device call.
# Packages the image already holds are dropped (its list: /work/.library/device/KINDS.md), except the
# reference we pin. openai and schemathesis are left out (~15 MB; their tests skip): the carried tree must
# stay under 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=""
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms="$platforms --platform $p"
done
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp $platforms -d .whl \
  transformers==5.23.0 soundfile soxr fastapi uvicorn python-multipart av
image="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs build certifi
charset-normalizer click cloudpickle colorama filelock fsspec h11 hf-xet httpcore httpx huggingface-hub
hypothesis idna iniconfig jinja2 markdown-it-py markupsafe mdurl numpy packaging pip pluggy pygments pytest
pyyaml regex requests rich safetensors setuptools shellingham six tokenizers tqdm typer typing-extensions
urllib3 werkzeug wheel"
for f in .whl/*.whl; do
  name=$(basename "$f" | cut -d- -f1 | tr '_A-Z' '-a-z')
  for i in $image; do [ "$name" = "$i" ] && rm "$f" && break; done
done
ls .whl
du -sh .whl
