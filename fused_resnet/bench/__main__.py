"""python -m fused_resnet.bench (fused_resnet/bench/__init__.py says what it measures)."""

from .cli import main

main()
