"""afdserve: Step-3 decoding with MFA attention and Attention-FFN Disaggregation.

`from afdserve import LLM, SamplingParams` loads torch only when these names are first used, so
the torch-free parts (`afdserve.cost`, the CLI's parsing) stay light.
"""
__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from afdserve.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from afdserve.sampling import SamplingParams
        return SamplingParams
    raise AttributeError(f"module 'afdserve' has no attribute {name!r}")
