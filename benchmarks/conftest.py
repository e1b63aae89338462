import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEVICE = torch.device(os.environ.get("FUSED_RESNET_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
