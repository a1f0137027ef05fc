"""aefast export: the torch.nn twin with its anomaly map, as ONNX (run in onnxruntime), torch.export and
TorchScript, matches aefast's fused model to fp32 tolerance."""
import os

import numpy as np
import onnxruntime
import pytest
import torch

import aefast
from aefast.cli import main
from aefast.export import FORMATS, export_detector, twin_detector
from aefast.models import ConvAutoencoder
from aefast.tasks import BEST_DIGITS, AnomalyMap, Detector

TOL = dict(rtol=1e-5, atol=1e-5)


def _fused_and_exported(tmp_path, index_reuse, formats, scorer):
    torch.manual_seed(0)
    kwargs = dict(in_channels=1, channels=(4, 6), index_reuse=index_reuse)
    fused = ConvAutoencoder(**kwargs).eval()
    exported = twin_detector("conv", kwargs, fused.state_dict(), scorer)
    example = torch.rand(3, 1, 28, 28)
    paths = export_detector(exported, example, str(tmp_path), formats)
    return Detector(fused, scorer).eval(), paths


@pytest.mark.parametrize("index_reuse", ["all", "deepest", "none"])
def test_onnx_round_trip_matches_the_fused_model(tmp_path, index_reuse):
    scorer = AnomalyMap("mse", sigma=1.0, top_fraction=0.02)
    fused, paths = _fused_and_exported(tmp_path, index_reuse, ("onnx",), scorer)
    session = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["reconstruction", "anomaly_map", "score"]
    for batch in (1, 5):                                    # the batch size is dynamic
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        recon, amap, score = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with aefast.set_backend("cpu"), torch.no_grad():
            want = fused(x)
        assert recon.shape == (batch, 1, 28, 28) and amap.shape == (batch, 28, 28) and score.shape == (batch,)
        torch.testing.assert_close(torch.from_numpy(recon), want.reconstruction, **TOL)
        torch.testing.assert_close(torch.from_numpy(amap), want.anomaly_map, **TOL)
        torch.testing.assert_close(torch.from_numpy(score), want.score, **TOL)


def test_torch_export_and_torchscript_match_and_ssim_exports(tmp_path):
    scorer = AnomalyMap("ssim", top_fraction=0.05)
    fused, paths = _fused_and_exported(tmp_path, "deepest", FORMATS, scorer)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = fused(x)
        for module in (torch.export.load(paths["torch_export"]).module(), torch.jit.load(paths["torchscript"])):
            got = module(x)
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, **TOL)
    session = onnxruntime.InferenceSession(paths["onnx"], providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-5, atol=1e-5)


def test_bad_export_requests(tmp_path):
    with pytest.raises(ValueError, match="formats"):
        export_detector(torch.nn.Identity(), torch.rand(1, 1, 8, 8), str(tmp_path), ("tflite",))
    with pytest.raises(ValueError, match="segmentation"):
        twin_detector("segnet", {}, {}, None)
    with pytest.raises(RuntimeError):                        # a state_dict of another model does not load
        twin_detector("conv", dict(in_channels=1, channels=(4,)), ConvAutoencoder(1, (5,)).state_dict())


def test_export_command_writes_and_checks_every_format(tmp_path, capsys):
    out = str(tmp_path / "d")
    code = main(["detect", "--data", "mnist", "--limit", "64", "--epochs", "1", "--channels", "4,8", "--out", out,
                 "--no-progress"])
    assert code == 0 and os.path.isfile(os.path.join(out, "detector.pt"))
    capsys.readouterr()
    exp = str(tmp_path / "e")
    code = main(["export", "--weights", os.path.join(out, "detector.pt"), "--out", exp, "--format", "onnx",
                 "--format", "torch_export", "--format", "torchscript"])
    printed = capsys.readouterr().out
    assert code == 0
    assert sorted(os.listdir(exp)) == ["detector.onnx", "detector.pt2", "detector.ts"]
    diffs = [float(line.split("= ")[-1]) for line in printed.splitlines() if "max |exported - aefast|" in line]
    assert len(diffs) == 3 and max(diffs) < 1e-5, printed
    assert f"sigma={BEST_DIGITS.sigma}" in printed           # the detector's own scorer went along


def test_export_help_documents_the_formats(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for word in ("onnx", "torch_export", "torchscript", "onnxruntime", "torch.nn-only twin", "anomaly_map"):
        assert word in text, word


def test_export_bad_files_exit_2(tmp_path, capsys):
    assert main(["export", "--weights", str(tmp_path / "none.pt"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    assert main(["export", "--weights", str(junk), "--out", str(tmp_path)]) == 2
    assert "not a readable" in capsys.readouterr().err
