"""fuyou-ray: fine-tune 10B-175B language models on one GPU with NVMe SSDs (the Fuyou method on Ray).

import fuyou_ray
cfg = fuyou_ray.load_config("configs/demo.yaml")
result = fuyou_ray.train(cfg)
"""

from fuyou_ray.config import ConfigError, RunConfig, load_config
from fuyou_ray.driver import TrainResult, train

__all__ = ["ConfigError", "RunConfig", "TrainResult", "load_config", "train"]
__version__ = "0.1.0"
