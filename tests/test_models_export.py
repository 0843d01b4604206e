"""The five reconstruction models: they learn, export to ONNX, and ONNX Runtime computes
what torch computes (batch 1, batch 5, any batch).  TimesNet's periods are fixed from
training data and provably baked into the graph.  Parity failures raise ExportError."""
from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch.nn import functional as F

from agent.model_meta import PADDLEX_MODELS
from export.models import ARCHITECTURE, REGISTRY, build_model
from export.models.timesnet import InceptionBlock, TimesNetAD, dft_basis
from export.onnx_export import ExportError, count_parameters, export_onnx, parity_check

TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # These models are tiny: one thread avoids oversubscribing a shared CI machine,
    # which made each training step ~10x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_series(n: int, channels: int, seed: int = 0, period: int = 16) -> np.ndarray:
    """Scaled multichannel series: a shared period with per-channel phase, a slow wave, noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    phase = np.arange(channels)[None, :]
    x = (np.sin(2 * np.pi * t / period + phase) + 0.5 * np.sin(2 * np.pi * t / (3 * period + 1))
         + 0.1 * rng.standard_normal((n, channels)))
    return ((x - x.mean(0)) / x.std(0)).astype(np.float32)


def windows_of(series: np.ndarray, window: int, step: int = 1) -> np.ndarray:
    w = np.lib.stride_tricks.sliding_window_view(series, window, axis=0)[::step]
    return np.ascontiguousarray(w.transpose(0, 2, 1))          # [N, W, C]


def eval_loss(model: torch.nn.Module, batch: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.mse_loss(model(batch), batch))


def ort_run(path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["recon"], {"x": x})[0]


def test_registry_and_architecture_names_agree():
    # the names the runtime, the benchmarks and the recipes know the models by
    assert set(REGISTRY) == set(ARCHITECTURE) == set(PADDLEX_MODELS) == {
        "AutoEncoder_ad", "DLinear_ad", "Nonstationary_ad", "PatchTST_ad", "TimesNet_ad"}
    assert all(name.startswith(ARCHITECTURE[name]) for name in REGISTRY)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("Nope_ad", 32, 3)
    with pytest.raises(ValueError, match="bad hyperparameters"):
        build_model("DLinear_ad", 32, 3, not_a_setting=1)


@pytest.mark.parametrize("window,channels", [(32, 3), (96, 8)])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_train_export_and_parity(name, window, channels, tmp_path):
    torch.manual_seed(0)
    series = make_series(40 * window, channels)
    wins = windows_of(series, window, step=3)
    model = build_model(name, window, channels)
    model.prepare(series)

    # A few optimisation steps must lower the reconstruction loss on a fixed batch.
    probe = torch.from_numpy(wins[:64])
    before = eval_loss(model, probe)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        model.train()
        idx = torch.randint(len(wins), (16,), generator=gen)
        batch = torch.from_numpy(wins[idx.numpy()])
        loss = F.mse_loss(model(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss(model, probe)
    assert math.isfinite(after) and after < 0.9 * before, (before, after)

    # hparams() is JSON and rebuilds an identical model.
    hp = json.loads(json.dumps(model.hparams()))
    clone = build_model(name, window, channels, **hp)
    clone.load_state_dict(model.state_dict())
    clone.eval()
    with torch.no_grad():
        torch.testing.assert_close(clone(probe), model(probe))
    assert count_parameters(model) == sum(p.numel() for p in model.parameters()) > 0

    path = tmp_path / f"{name}.onnx"
    assert export_onnx(model, path, window, channels) == 17
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["x"] and [o.name for o in graph.output] == ["recon"]
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [window, channels]

    diff = parity_check(model, path, wins[:5])
    assert 0.0 <= diff <= TOL

    # Explicit batch 1 / 5 parity and a batch size never seen at export (dynamic axis).
    model.eval()
    for n in (1, 5, 7):
        x = wins[10:10 + n]
        got = ort_run(path, x)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert got.shape == (n, window, channels)
        assert np.max(np.abs(got - want)) <= TOL


# --- TimesNet: periods are fixed once from training data -------------------------------

def reshape_shapes(path) -> set[tuple[int, ...]]:
    """Every constant shape fed to a Reshape node in the ONNX graph."""
    m = onnx.load(str(path))
    consts = {init.name: numpy_helper.to_array(init) for init in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return {tuple(int(v) for v in consts[n.input[1]])
            for n in m.graph.node if n.op_type == "Reshape" and n.input[1] in consts}


def test_timesnet_prepare_finds_the_dominant_period():
    series = make_series(3000, 4, period=16)
    model = TimesNetAD(96, 4, top_k=3)
    model.prepare(series)
    assert model.freqs[0] == 96 // 16 and model.periods[0] == 16
    assert model.hparams()["periods"] == model.periods and len(model.periods) == 3
    assert all(isinstance(p, int) for p in model.hparams()["periods"])


def test_timesnet_refuses_to_run_without_fixed_periods():
    model = TimesNetAD(32, 3)
    with pytest.raises(RuntimeError, match="prepare"):
        model(torch.zeros(1, 32, 3))
    with pytest.raises(ValueError, match="train must be"):
        model.prepare(np.zeros((100, 5)))
    with pytest.raises(ValueError, match="do not match"):
        TimesNetAD(96, 3, top_k=2, freqs=[4, 8], periods=[24, 11])


def test_timesnet_exported_graph_uses_the_stored_periods(tmp_path):
    torch.manual_seed(0)
    window, channels, d_model = 96, 3, 8
    a = TimesNetAD(window, channels, d_model=d_model, top_k=2, freqs=[4, 7])
    b = TimesNetAD(window, channels, d_model=d_model, top_k=2, freqs=[3, 12])
    b.load_state_dict(a.state_dict())
    pa, pb = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(a, pa, window, channels)
    export_onnx(b, pb, window, channels)

    def grids(periods):
        return {(-1, math.ceil(window / p), p, d_model) for p in periods}

    assert a.periods == [24, 13] and b.periods == [32, 8]
    assert grids(a.periods) <= reshape_shapes(pa)
    assert grids(b.periods) <= reshape_shapes(pb)
    assert not grids(b.periods) & reshape_shapes(pa)
    # Same weights, different stored periods: different function, and each file follows its own.
    x = windows_of(make_series(400, channels), window, step=50)[:4]
    out_a, out_b = ort_run(pa, x), ort_run(pb, x)
    assert np.max(np.abs(out_a - out_b)) > 1e-3
    parity_check(a, pa, x)
    parity_check(b, pb, x)
    # The rebuilt-from-hparams model carries the periods.
    assert build_model("TimesNet_ad", window, channels, **a.hparams()).periods == [24, 13]


def test_timesnet_fused_inception_equals_mean_of_separate_convs():
    torch.manual_seed(0)
    block = InceptionBlock(4, 6, num_kernels=4)
    x = torch.randn(2, 4, 5, 7)
    reference = torch.stack([conv(x) for conv in block.kernels], dim=-1).mean(-1)
    weight, bias = block.fused()
    torch.testing.assert_close(F.conv2d(x, weight, bias, padding=block.half), reference,
                               atol=1e-5, rtol=1e-5)


def test_timesnet_dft_amplitudes_match_fft():
    torch.manual_seed(0)
    x = torch.randn(3, 96, 5)
    freqs = [4, 9, 30]
    proj = torch.matmul(x.transpose(1, 2), dft_basis(96, freqs))
    amp = torch.sqrt(proj[..., :3] ** 2 + proj[..., 3:] ** 2)
    want = torch.fft.rfft(x, dim=1).abs()[:, freqs, :].transpose(1, 2)
    torch.testing.assert_close(amp, want, atol=1e-4, rtol=1e-4)


# --- parity failures are loud ---------------------------------------------------------

def test_parity_check_raises_when_model_and_file_differ(tmp_path):
    torch.manual_seed(0)
    window, channels = 32, 3
    wins = windows_of(make_series(400, channels), window, step=7)
    model = build_model("DLinear_ad", window, channels)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, window, channels)
    assert parity_check(model, path, wins) <= TOL

    # The torch model changes after export.
    with torch.no_grad():
        model.linear_trend.bias.add_(0.01)
    with pytest.raises(ExportError, match="disagree"):
        parity_check(model, path, wins)
    with torch.no_grad():
        model.linear_trend.bias.sub_(0.01)
    assert parity_check(model, path, wins) <= TOL

    # The ONNX file is tampered with.
    m = onnx.load(str(path))
    init = next(i for i in m.graph.initializer if i.dims == [window, window])
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 1.01, init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(m, str(bad))
    with pytest.raises(ExportError, match="max \\|diff\\|"):
        parity_check(model, bad, wins)

    with pytest.raises(ExportError, match="parity windows"):
        parity_check(model, path, wins[0])


class _DataDependent(torch.nn.Module):
    """Uses a value computed from the input as a Python int: a trace would freeze it."""

    def forward(self, x):
        shift = int(x[0, 0, 0].abs().ceil())
        return torch.roll(x, shift, dims=1)


def test_export_rejects_traces_that_freeze_data_dependent_values(tmp_path):
    path = tmp_path / "frozen.onnx"
    with pytest.raises(ExportError, match="froze data-dependent"):
        export_onnx(_DataDependent(), path, 16, 2)
    assert not path.exists()


def test_dlinear_exports_as_one_affine_map_equal_to_the_model(tmp_path):
    # Trained weights, not the constant init, so the fold is checked on a non-trivial map.
    torch.manual_seed(0)
    model = build_model("DLinear_ad", 48, 4, moving_avg=7)
    wins = windows_of(make_series(30 * 48, 4), 48, step=2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for i in range(0, 320, 32):
        xb = torch.from_numpy(wins[i:i + 32])
        loss = F.mse_loss(model(xb), xb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path / "dl.onnx"
    export_onnx(model, path, 48, 4)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMul") == 1 and "AveragePool" not in ops and len(ops) <= 3, ops
    assert parity_check(model, path, wins[:64]) <= TOL
    # Edge windows (a step at the first/last sample) exercise the moving average's padding.
    edge = np.zeros((2, 48, 4), np.float32)
    edge[0, 0, :], edge[1, -1, :] = 5.0, -5.0
    with torch.no_grad():
        expected = model(torch.from_numpy(edge)).numpy()
    np.testing.assert_allclose(ort_run(path, edge), expected, atol=TOL)
