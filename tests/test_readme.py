"""The README's Python example runs as written (my_model stands for the user's own model)."""
import re
from pathlib import Path

import torch


def test_three_ways_in_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Three ways in\n\n```python\n(.*?)```", text, re.S).group(1)
    nn = torch.nn
    namespace = {"my_model": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                           nn.ConvTranspose2d(4, 1, 2, stride=2))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["my_model"].aefast_rewrites == ["conv_pool2d <- 0 -> relu -> max_pool2d(2, 2)",
                                                     "conv_transpose_act2d <- 3 (ConvTranspose2d, stride (2, 2)) -> "
                                                     "no activation"]
    assert namespace["my_model"].aefast_unfused == []
