"""Co-design decoding-cost model of the Step-3 report (arXiv 2507.19427, sections 4-5).

Pure Python: importing this package (or `afdserve.cost.cli`) never imports torch.

- `arch`: `ModelArch`, `MODEL_PRESETS`, `get_model`, `from_hf_config`
- `hardware`: `Hardware`, `HARDWARE_PRESETS`, `get_hardware`, `parse_prices`, `with_price`
- `analysis`: `per_token_work`, `arithmetic_intensity`, `cost_report`, `sparsity_report`
"""
from afdserve.cost.analysis import (PerTokenWork, Precision, arithmetic_intensity, cost_report,
                                    per_token_work, sparsity_report)
from afdserve.cost.arch import MODEL_PRESETS, ModelArch, from_hf_config, get_model
from afdserve.cost.hardware import (HARDWARE_PRESETS, Hardware, get_hardware, parse_prices,
                                    with_price)

__all__ = [
    "ModelArch", "MODEL_PRESETS", "get_model", "from_hf_config",
    "Hardware", "HARDWARE_PRESETS", "get_hardware", "parse_prices", "with_price",
    "Precision", "PerTokenWork", "per_token_work", "arithmetic_intensity", "cost_report",
    "sparsity_report",
]
