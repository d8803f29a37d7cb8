"""A benchmarking harness for parameter- and memory-efficient transfer learning."""

import logging

__version__ = "0.1.0"

# peft imports bitsandbytes when it is installed, whose CPU backend warns at import, on CPUs with AVX512-BF16,
# that an optional kernel package is missing: the harness runs quantised weights on CUDA only, so the warning
# speaks of a kernel no cell uses, in every run.
logging.getLogger("bitsandbytes.backends.cpu").setLevel(logging.ERROR)
