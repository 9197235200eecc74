"""What the benchmarks record about the machine they ran on."""

from approxtune.export.runtimes import cpu_model

__all__ = ["cpu_model"]
