"""The README's Python example runs as written (my_model stands for the user's own model)."""
import re
from pathlib import Path

import torch


def test_three_ways_in_example_runs(capsys):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    code = re.search(r"## Three ways in\n\n```python\n(.*?)```", text, re.S).group(1)
    namespace = {"my_model": torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2))}
    exec(compile(code, "README.md", "exec"), namespace)
    assert torch.isfinite(namespace["loss"])
    assert namespace["my_model"].aefast_rewrites == ["conv_pool2d <- 0 -> relu -> max_pool2d(2, 2)"]
