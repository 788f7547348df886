"""Offline batch synthesis: `csm batch REQUESTS.jsonl --out DIR` on one machine, or on Ray with `--ray`.

requests.py   the requests file, checked with line numbers before any work
output.py     the output folder: atomic audio files, manifest.jsonl, job.json, the resume rule
runner.py     Synthesizer: lines through one BatchCore (continuous batching), sentence by sentence
on_ray.py     the same Synthesizer in Ray Data actors
(the command itself is csm/cli/batch.py)
"""

from .output import OutputDir
from .requests import BadLine, LineRequest, read_requests

__all__ = ["BadLine", "LineRequest", "OutputDir", "read_requests"]
