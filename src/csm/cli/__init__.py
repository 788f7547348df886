"""The `csm` command (`csm.cli:main`, `python -m csm`).

main.py      the parser: every command's flags, collected; `main()` runs one and turns errors into one line
common.py    what commands share: model and sampling flags, loading, seeds, output checks, PCM and WAV on stdout
say.py, dialogue.py, batch.py, voice.py, serve.py, demo.py, convert.py, finetune.py: one command each
"""

from .common import DEFAULT_MODEL, EXIT_ERROR, CliError
from .main import build_parser, main

__all__ = ["DEFAULT_MODEL", "EXIT_ERROR", "CliError", "build_parser", "main"]
