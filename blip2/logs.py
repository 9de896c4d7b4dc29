"""Third-party noise kept out of the command lines' output (`blip2-serve`, `blip2-train`).

Each record below is dropped by its logger and its message, never by level: the same libraries' other
warnings and errors still show, and so does everything this project logs.
- torchao is imported by transformers whenever it is installed, whatever `--quantization` says
  (`transformers/quantizers/quantizer_torchao.py`), and at import it tries every optional kernel library it
  ships: those built for another Python or for a GPU this machine lacks fail with `Failed to load
  .../torchao/_C_*.so`, and it warns that Triton, which only its GPU kernels use, is missing. Neither
  touches weight-only int8 on the CPU, and on a GPU the kernels that apply load.
- torch deprecates registering Enum classes with pytree, which torchao still does at import.
- faiss (Milvus Lite's index) logs at INFO each SIMD build it tries before the one that loads: `Could not
  load library with AVX512 support` only means the next one is tried.
- Milvus Lite's in-process gRPC server has no `AllocTimestamp`, which pymilvus calls while it waits for a
  new index and ignores when unimplemented; grpc logs each such call as an ERROR with a traceback.
"""

from __future__ import annotations

import functools
import logging
import re

# logger -> the message of the records dropped from it (re.search on the formatted message).
NOISE: dict[str, str] = {
    "torchao": r"^Failed to load \S*/torchao/_C\w*[.\w-]*\.so",
    "torchao.kernel.intmm": r"Detected no triton",
    "torch.utils._pytree": r"is an Enum subclass and is now natively supported",
    "grpc._server": r"^Exception calling application: Method not implemented!$",
    # `blip2-train init` grows the LLM's vocabulary for its image token; transformers' mean-and-covariance
    # initialisation of the new rows is the intended one, and its notice reads like a warning to act on.
    "transformers.modeling_utils": r"^The new embeddings will be initialized from a multivariate normal",
}
QUIET_BELOW_WARNING = ("faiss",)


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


@functools.cache
def quiet_third_party_logs() -> None:
    """Install the filters (once per process). Call it before transformers is imported: torchao logs while
    transformers imports it."""
    for name, pattern in NOISE.items():
        logging.getLogger(name).addFilter(_DropMatching(pattern))
    for name in QUIET_BELOW_WARNING:
        logging.getLogger(name).setLevel(logging.WARNING)


def quiet_transformers_progress_bars() -> None:
    """No progress bars from transformers' own loading and saving of weights (a few hundred milliseconds
    each, drawn into a log); a download from the Hugging Face Hub keeps its bar. Imports transformers' logging
    module only (no torch), so call it when a command runs, not for `--help`."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars
    from transformers.utils import logging as transformers_logging

    downloads_shown = not are_progress_bars_disabled()
    transformers_logging.disable_progress_bar()  # also turns the Hub's bars off:
    if downloads_shown:
        enable_progress_bars()  # a first download of a model (gigabytes) keeps its bar
