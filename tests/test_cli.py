"""The aefast command: clean errors (exit 2, no traceback), exact resume, the demo's outputs."""
import json
import os
import subprocess
import sys

import pytest
import torch

from aefast.cli import main


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _run_exit(argv, capsys):
    """argparse errors raise SystemExit(2) after printing usage and the message."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return exc.value.code, out, err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "transformer"], "invalid choice"),
    (["train", "--epochs", "0"], "positive integer"),
    (["train", "--epochs", "two"], "positive integer"),
    (["train", "--batch-size", "-4"], "positive integer"),
    (["train", "--lr", "nan"], "positive number"),
    (["train", "--channels", "16,x"], "comma-separated"),
    (["segment", "--model", "conv"], "invalid choice"),
    (["detect", "--data", "cifar10"], "invalid choice"),
    (["demo", "--backend", "tpu"], "invalid choice"),
    (["train", "--seed", "-1"], "non-negative"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, capsys):
    code, _, err = _run_exit(argv, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_bad_files_and_runtime_problems_exit_2(tmp_path, capsys):
    out = str(tmp_path / "o")
    cases = [
        (["detect", "--weights", str(tmp_path / "missing.pt"), "--out", out], "does not exist"),
        (["train", "--model", "deep", "--data", "digits", "--resume", "--out", out], "does not exist"),
        (["train", "--model", "segnet", "--data", "digits", "--out", out], "needs masks"),
        (["train", "--model", "conv", "--data", "digits", "--channels", "4,4,4,4", "--out", out], "pooling stages"),
        (["detect", "--data", "textures", "--model", "segnet", "--out", out], "needs a reconstruction model"),
    ]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    cases.append((["detect", "--model", "conv_dae", "--weights", str(garbage), "--out", out], "not a readable"))
    not_dir = tmp_path / "file"
    not_dir.write_text("x")
    cases.append((["train", "--out", str(not_dir)], "not a directory"))
    if not torch.cuda.is_available():
        cases.append((["train", "--device", "cuda", "--out", out], "cuda"))
    for argv, message in cases:
        try:
            code, _, err = _run(argv, capsys)
        except SystemExit as exc:
            code, err = exc.code, capsys.readouterr()[1]
        assert code == 2, argv
        assert message in err, (argv, err)
        assert "Traceback" not in err


def test_wrong_checkpoint_for_resume_is_a_clear_error(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = ["train", "--model", "linear", "--data", "digits", "--limit", "64", "--epochs", "1", "--out", out,
            "--no-progress"]
    assert _run(base, capsys)[0] == 0
    code, _, err = _run([*base[:-1], "--lr", "0.5", "--resume", "--no-progress"], capsys)
    assert code == 2 and "different run" in err


def test_subprocess_error_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aefast", "detect", "--weights", str(tmp_path / "nope.pt"),
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


@pytest.mark.parametrize("model, data, extra, stops", [
    ("deep", "digits", ["--limit", "200"], (2, 7)),               # 7 steps per epoch: 7 is an epoch end
    # corruption noise comes from the RNG whose state the checkpoint carries
    ("conv_dae", "mnist", ["--limit", "96", "--channels", "4,8"], (2, 4)),   # 3 steps per epoch
])
def test_resume_ends_with_the_same_parameters(tmp_path, capsys, model, data, extra, stops):
    common = ["train", "--model", model, "--data", data, "--epochs", "2", "--batch-size", "32", "--no-progress",
              *extra]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    assert _run([*common, "--out", whole], capsys)[0] == 0
    # "interrupted" twice (mid-epoch, then at or across an epoch end), then resumed to the end
    code, out, _ = _run([*common, "--out", parts, "--max-steps", str(stops[0])], capsys)
    assert code == 0 and f"stopped after {stops[0]} steps" in out
    assert not os.path.exists(os.path.join(parts, "model.pt"))
    code, out, _ = _run([*common, "--out", parts, "--resume", "--max-steps", str(stops[1])], capsys)
    assert code == 0 and f"stopped after {stops[1]} steps" in out
    assert _run([*common, "--out", parts, "--resume"], capsys)[0] == 0
    a, b = _state(os.path.join(whole, "model.pt")), _state(os.path.join(parts, "model.pt"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not [f for f in os.listdir(parts) if f.endswith(".tmp")]     # atomic writes leave no temp files


def test_demo_quick_writes_pngs_and_figures(tmp_path, capsys):
    out = str(tmp_path / "demo")
    code, stdout, _ = _run(["demo", "--quick", "--seeds", "2", "--out", out, "--no-progress"], capsys)
    assert code == 0
    for name in ("reconstructions.png", "anomaly_maps.png", "loss_curve.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    summary = json.load(open(os.path.join(out, "demo.json")))
    assert summary["twin_max_abs_diff"] < 1e-4
    assert summary["speed_ratio"] > 0
    assert summary["seeds"] == [0, 1]
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        per_seed = summary["test"][key]["per_seed"]
        assert len(per_seed) == 2 and all(0 <= v <= 1 for v in per_seed)
        assert summary[key] == pytest.approx(sum(per_seed) / 2)      # the printed figure is the seeds' mean
    for text in ("speed:", "image AUROC", "pixel AUROC", "AUPRO", "±", "identity-noise baseline", "training loss"):
        assert text in stdout


def test_segment_reduce_detect_print_their_figures(tmp_path, capsys):
    code, out, _ = _run(["reduce", "--model", "linear", "--data", "digits", "--latent", "4", "--out",
                         str(tmp_path / "r"), "--no-progress"], capsys)
    assert code == 0 and "largest principal angle to PCA" in out
    angle = float(out.split("largest principal angle to PCA ")[1].split()[0])
    assert angle < 2.0
    code, out, _ = _run(["segment", "--limit", "48", "--epochs", "1", "--channels", "4,8", "--out",
                         str(tmp_path / "s"), "--no-progress"], capsys)
    assert code == 0 and "mean IoU" in out and os.path.exists(tmp_path / "s" / "segmentation.png")
    code, out, _ = _run(["detect", "--limit", "48", "--epochs", "1", "--channels", "4", "--out", str(tmp_path / "d"),
                         "--no-progress"], capsys)
    assert code == 0 and "image AUROC" in out and os.path.exists(tmp_path / "d" / "anomaly_maps.png")
    code, out, _ = _run(["detect", "--data", "textures_hard", "--limit", "48", "--epochs", "1", "--channels", "4",
                         "--out", str(tmp_path / "h"), "--no-progress"], capsys)
    assert code == 0 and "pixel AUROC" in out and "AUPRO" in out
    # a model trained by detect is read back by detect --weights (same figures, no training)
    first = out.split("defect detection on")[1].split("wrote")[0]
    code, out, _ = _run(["detect", "--data", "textures_hard", "--limit", "48", "--weights",
                         str(tmp_path / "h" / "detector.pt"), "--channels", "4", "--out", str(tmp_path / "h2"),
                         "--no-progress"], capsys)
    assert code == 0 and out.split("defect detection on")[1].split("wrote")[0] == first


def test_sdae_train_prints_with_and_without_pretraining(tmp_path, capsys):
    code, out, _ = _run(["train", "--model", "sdae", "--data", "digits", "--limit", "128", "--epochs", "1",
                         "--pretrain-epochs", "1", "--hidden", "16,8", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 0
    assert "pretraining layer 1" in out and "pretraining layer 2" in out
    assert "with layer-wise pretraining" in out and "without pretraining" in out
