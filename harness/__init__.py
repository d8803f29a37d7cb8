"""A benchmarking harness for parameter- and memory-efficient transfer learning."""

__version__ = "0.1.0"
