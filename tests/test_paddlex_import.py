"""`tsad-export paddlex`: PaddleX inference folder -> ONNX + metadata.

The Paddle side (building models, paddle.jit.save, paddle2onnx, unpickling scaler.pkl,
PaddleX's own predictor) runs in .venv-paddle through a subprocess, so this process
and the runtime stay Paddle-free.  YAML and folder checks need no Paddle and always run.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from agent.model_meta import load_meta
from export.cli import main as export_cli
from export.paddlex_folder import PaddleXImportError, load_inference_yaml, read_folder
from tests.conftest import REPO, SKAB

PADDLE_PY = REPO / ".venv-paddle" / "bin" / "python"
needs_paddle = pytest.mark.skipif(
    not PADDLE_PY.exists(),
    reason=f"{PADDLE_PY} not found: run export/recipes/paddle_env.sh (paddlepaddle + paddle2onnx "
           "live in their own venv)")

WINDOW = 32
CHANNELS = ["Accelerometer1RMS", "Accelerometer2RMS", "Current", "Pressure", "Temperature",
            "Thermocouple", "Voltage", "Volume Flow RateRMS"]
# A PaddleX model name per test architecture: PaddleX's predictor only runs models it knows.
ARCHS = {"mlp_ae": "AutoEncoder_ad", "dlinear": "DLinear_ad", "transformer": "Nonstationary_ad"}

# Runs in .venv-paddle: argv = work dir.  Reads raw.npz, writes one PaddleX-style folder
# per architecture plus the eager outputs the conversions are compared with.
BUILDER = r'''
import json, sys
from pathlib import Path
import joblib, numpy as np, paddle, yaml
from paddle import nn
from paddle.static import InputSpec
from sklearn.preprocessing import StandardScaler

work = Path(sys.argv[1])
raw = np.load(work / "raw.npz")
W, C = raw["windows"].shape[1:]
KEY = "observed_cov_numeric"          # what PaddleTS anomaly networks read


class MLPAutoEncoder(nn.Layer):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(W * C, 48), nn.ReLU(), nn.Linear(48, 12), nn.ReLU())
        self.dec = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, W * C))

    def forward(self, X):
        x = X[KEY].cast("float32")
        y = self.dec(self.enc(x.reshape([-1, W * C]))).reshape([-1, W, C])
        return y, x


class DLinear(nn.Layer):
    """PaddleTS DLinear_AD: moving-average decomposition, one Linear per part."""
    def __init__(self, kernel=25):
        super().__init__()
        self.k = kernel
        self.avg = nn.AvgPool1D(kernel_size=kernel, stride=1, padding=0)
        self.seasonal = nn.Linear(W, W)
        self.trend = nn.Linear(W, W)

    def forward(self, X):
        x = X[KEY].cast("float32")
        front = x[:, 0:1, :].tile([1, (self.k - 1) // 2, 1])
        end = x[:, -1:, :].tile([1, (self.k - 1) // 2, 1])
        trend = self.avg(paddle.concat([front, x, end], axis=1).transpose([0, 2, 1]))
        seasonal = x.transpose([0, 2, 1]) - trend
        y = self.seasonal(seasonal) + self.trend(trend)
        return y.transpose([0, 2, 1]), x


class Transformer(nn.Layer):
    """Token embedding by circular Conv1D (as PaddleTS Nonstationary/TimesNet) + attention."""
    def __init__(self, d=16):
        super().__init__()
        self.embed = nn.Conv1D(C, d, 3, padding=1, padding_mode="circular", bias_attr=False)
        self.pos = paddle.create_parameter([1, W, d], "float32",
                                           default_initializer=nn.initializer.Normal(std=0.1))
        self.block = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=32, dropout=0.0)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, C)

    def forward(self, X):
        x = X[KEY].cast("float32")
        h = self.embed(x.transpose([0, 2, 1])).transpose([0, 2, 1]) + self.pos
        return self.out(self.norm(self.block(h))), x


scaler = StandardScaler().fit(raw["train"])
scaled = (raw["windows"] - scaler.mean_) / scaler.scale_      # float64, as PaddleX's TSNormalize
xin = paddle.to_tensor(scaled.astype("float32"))
paddlex_names = dict(zip(("mlp_ae", "dlinear", "transformer"), sys.argv[2:]))
report = {"mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist(), "models": {}}
paddle.seed(0)
for arch, cls in (("mlp_ae", MLPAutoEncoder), ("dlinear", DLinear), ("transformer", Transformer)):
    net = cls()
    net.eval()
    with paddle.no_grad():
        eager = net({KEY: xin})[0].numpy()
    np.save(work / f"eager_{arch}.npy", eager)
    # PaddleX GetAnomaly: float32 reconstruction minus float64 scaled input
    score = np.mean(np.square(eager - scaled), axis=-1).ravel()
    # threshold in the widest gap between the 70th and 95th percentile scores, so float
    # rounding between two correct implementations cannot flip a label
    s = np.sort(score)
    lo, hi = int(0.70 * len(s)), int(0.95 * len(s))
    k = lo + int(np.argmax(np.diff(s[lo:hi + 1])))
    threshold = float((s[k] + s[k + 1]) / 2)
    folder = work / f"{arch}_infer"
    folder.mkdir()
    paddle.jit.save(net, str(folder / "inference"),
                    input_spec=[{KEY: InputSpec([None, W, C], "float32", name=KEY)}])
    joblib.dump(scaler, folder / "scaler.pkl")
    cfg = {   # the layout PaddleTS' export writes (input shapes are Python tuples)
        "Global": {"model_name": paddlex_names[arch]},
        "model_type": "anomaly",
        "ancestor_classname_set": [cls.__name__ + "_AD", "AnomalyBaseModel", "ABC", "object"],
        "modulename": "paddlets.models.anomaly.dl." + arch,
        "model_threshold": threshold,
        "size": {"in_chunk_len": int(W)},
        "input_data": {KEY: (None, int(W), int(C))},
        "time_feat": False, "holiday": False, "scale": True,
        "info_params": {"freq": 1, "time_col": "timestamp",
                        "feature_cols": [str(c) for c in raw["channels"]]},
    }
    (folder / "inference.yml").write_text(yaml.dump(cfg))
    report["models"][arch] = {"threshold": threshold, "positives": int((score >= threshold).sum())}
(work / "report.json").write_text(json.dumps(report))
'''

# Runs in .venv-paddle: PaddleX's own TSAdPredictor on one CSV per model.
PADDLEX_RUNNER = r'''
import sys
from paddlex import create_model
for name, folder, csv, out in zip(*[iter(sys.argv[1:])] * 4):
    model = create_model(model_name=name, model_dir=folder, device="cpu")
    for res in model.predict(csv, batch_size=1):
        res.save_to_csv(save_path=out)
'''


def _paddle(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(PADDLE_PY), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _skab(path: Path):
    import pandas as pd
    return pd.read_csv(path, sep=";")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Three PaddleX-style folders built in .venv-paddle, converted with tsad-export paddlex."""
    if not PADDLE_PY.exists():
        pytest.skip(f"{PADDLE_PY} not found: run export/recipes/paddle_env.sh")
    if not SKAB.is_dir():
        pytest.skip(f"SKAB data not found at {SKAB} (expected ../shared/data/skab beside the repo)")
    work = tmp_path_factory.mktemp("paddlex")
    free = _skab(SKAB / "anomaly-free" / "anomaly-free.csv")[CHANNELS].to_numpy(np.float64)
    test = _skab(SKAB / "valve1" / "0.csv")[CHANNELS].to_numpy(np.float64)
    starts = np.linspace(0, len(test) - WINDOW, 40).astype(int)
    windows = np.stack([test[s:s + WINDOW] for s in starts])
    np.savez(work / "raw.npz", train=free[:2000], windows=windows, channels=np.array(CHANNELS))
    (work / "builder.py").write_text(BUILDER)
    r = _paddle([str(work / "builder.py"), str(work), *ARCHS.values()])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    models = {}
    for arch in ARCHS:
        out = work / f"{arch}.onnx"
        r = _paddle(["-m", "export.cli", "paddlex", str(work / f"{arch}_infer"), "--out", str(out),
                     "--data", str(SKAB / "valve1" / "1.csv")])
        assert r.returncode == 0, f"{arch}: {r.stderr[-3000:]}"
        models[arch] = out
    return {"work": work, "windows": windows, "report": report, "models": models}


@needs_paddle
@pytest.mark.parametrize("arch", list(ARCHS))
def test_onnx_matches_paddle_eager_and_labels(built, arch):
    meta = load_meta(built["models"][arch])
    assert meta.channels == CHANNELS and meta.window == WINDOW
    assert meta.scaler.mean == built["report"]["mean"]          # copied, not refitted
    assert meta.scaler.std == built["report"]["scale"]
    threshold = built["report"]["models"][arch]["threshold"]
    assert meta.threshold.value == threshold
    assert meta.training["parity_max_abs_diff"] <= 1e-4
    assert meta.hyperparameters["paddlex"]["graph_edits"]["input_renamed"] == {"observed_cov_numeric": "x"}
    assert meta.hyperparameters["paddlex"]["graph_edits"]["outputs_dropped"], "y_true output kept"

    import onnxruntime as ort
    sess = ort.InferenceSession(str(built["models"][arch]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    assert [o.name for o in sess.get_outputs()] == ["recon"]
    scaled = (built["windows"] - np.array(meta.scaler.mean)) / np.array(meta.scaler.std)
    got = sess.run(["recon"], {"x": scaled.astype(np.float32)})[0]
    eager = np.load(built["work"] / f"eager_{arch}.npy")
    assert np.max(np.abs(got.astype(np.float64) - eager)) <= 1e-4

    def labels(recon):      # PaddleX GetAnomaly, every row of every window
        return np.mean(np.square(recon - scaled), axis=-1) >= meta.threshold.value
    want = labels(eager)
    assert 0 < want.sum() < want.size, "threshold must split the rows for this check to mean anything"
    np.testing.assert_array_equal(labels(got), want)


@needs_paddle
@pytest.mark.parametrize("arch", list(ARCHS))
def test_converted_model_passes_verify_and_loads_in_detector(built, arch, capsys):
    path = built["models"][arch]
    assert export_cli(["verify", str(path)]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    from agent.detector import Detector
    det = Detector(str(path))
    x = np.random.default_rng(1).standard_normal((5, WINDOW, len(CHANNELS))).astype(np.float32)
    assert det.infer(x).shape == x.shape


@needs_paddle
def test_circular_padding_raises_opset(built):
    # ONNX Pad(mode="wrap") exists from opset 19; paddle2onnx upgrades from our 17 itself
    assert load_meta(built["models"]["transformer"]).opset >= 19
    assert load_meta(built["models"]["dlinear"]).opset == 17


def _has_paddlex() -> bool:
    return PADDLE_PY.exists() and _paddle(["-c", "import paddlex"], timeout=120).returncode == 0


@needs_paddle
def test_labels_byte_identical_to_paddlex_predictor(built, tmp_path):
    if not _has_paddlex():
        pytest.skip("PaddleX is not in .venv-paddle: run export/recipes/paddle_env.sh --with-paddlex")
    # PaddleX wants a regular time index: integer steps, as in its own PSM examples
    df = _skab(SKAB / "valve1" / "2.csv")[CHANNELS].iloc[:200]
    df.insert(0, "timestamp", np.arange(len(df)))
    args = []
    for arch, name in ARCHS.items():
        csv = tmp_path / f"{arch}.csv"
        df.to_csv(csv, index=False)
        args += [name, str(built["work"] / f"{arch}_infer"), str(csv), str(tmp_path / "paddlex")]
    (tmp_path / "run.py").write_text(PADDLEX_RUNNER)
    r = _paddle([str(tmp_path / "run.py"), *args])
    assert r.returncode == 0, r.stderr[-3000:]
    for arch in ARCHS:
        r = subprocess.run([sys.executable, "-m", "agent.cli", "predict", "--input",
                            str(tmp_path / f"{arch}.csv"), "--model", str(built["models"][arch]),
                            "--save_path", str(tmp_path / "ours"), "--paddlex-compat",
                            "--calibrate", "0"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        theirs = (tmp_path / "paddlex" / f"{arch}_res.csv").read_bytes()
        ours = (tmp_path / "ours" / f"{arch}_res.csv").read_bytes()
        assert theirs.count(b"\n") == WINDOW + 1
        assert ours == theirs, f"{arch}:\nPaddleX:\n{theirs.decode()}\nours:\n{ours.decode()}"


# ------------------------------------------------------------------ no Paddle needed
def _folder(tmp_path: Path, yml: str, files=("inference.json", "inference.pdiparams")) -> Path:
    d = tmp_path / "M_infer"
    d.mkdir()
    for f in files:
        (d / f).write_bytes(b"")
    (d / "inference.yml").write_text(textwrap.dedent(yml))
    return d


GOOD_YML = """\
    Global:
      model_name: DLinear_ad
    model_type: anomaly
    model_threshold: 0.25
    size:
      in_chunk_len: 32
    input_data:
      observed_cov_numeric: !!python/tuple
      - null
      - 32
      - 2
    time_feat: false
    scale: false
    info_params:
      freq: 1
      time_col: timestamp
      feature_cols:
      - a
      - b
    """


def test_tuple_tag_loads(tmp_path):
    d = _folder(tmp_path, GOOD_YML)
    cfg = load_inference_yaml(d / "inference.yml")
    assert cfg["input_data"]["observed_cov_numeric"] == (None, 32, 2)
    px = read_folder(d)
    assert (px.name, px.window, px.channels, px.threshold) == ("DLinear_ad", 32, ["a", "b"], 0.25)
    assert (px.series_input, px.scaler_file, px.time_col) == ("observed_cov_numeric", None, "timestamp")


@pytest.mark.parametrize("tag", [
    "!!python/object/apply:numpy.core.multiarray.scalar [1]",
    "!!python/object/apply:os.system ['touch {marker}']",
    "!!python/name:os.system",
    "!!python/object/new:subprocess.Popen [['touch', '{marker}']]",
    "!custom 3",
])
def test_other_tags_are_refused_and_never_run(tmp_path, tag):
    marker = tmp_path / "ran"
    yml = tmp_path / "inference.yml"
    yml.write_text(f"model_threshold: 0.5\nsize: {tag.format(marker=marker)}\n")
    with pytest.raises(PaddleXImportError, match=r"line 2: .*only the !!python/tuple tag"):
        load_inference_yaml(yml)
    assert not marker.exists()


FILES = ("inference.json", "inference.pdiparams")


@pytest.mark.parametrize("files,edit,message", [
    ((), None, r"no Paddle program \(inference.json or inference.pdmodel\)"),
    (("inference.json",), None, r"inference.pdiparams missing"),
    (("inference.pdmodel", "inference.pdiparams"), ("scale: false", "scale: true"),
     r"scaler.pkl missing but inference.yml says scale: true"),
    (FILES, ("model_threshold: 0.25", "model_threshold: .nan"), r"model_threshold is nan"),
    (FILES, ("in_chunk_len: 32", "in_chunk_len: 64"),
     r"input_data.observed_cov_numeric is \(None, 32, 2\) but size.in_chunk_len is 64"),
    (FILES, ("time_feat: false", "time_feat: true"), r"time_feat is on"),
    (FILES, ("time_feat: false", "  known_cov_numeric: !!python/tuple [null, 40, 4]\ntime_feat: false"),
     r"exactly one series input"),
    (FILES, ("model_type: anomaly", "model_type: forecast"), r"expected 'anomaly'"),
    (FILES, ("  - b\n", "  - a\n"), r"duplicate names"),
])
def test_bad_folders_give_clear_errors(tmp_path, files, edit, message):
    yml = textwrap.dedent(GOOD_YML)
    if edit:
        assert edit[0] in yml
        yml = yml.replace(edit[0], edit[1])
    with pytest.raises(PaddleXImportError, match=message):
        read_folder(_folder(tmp_path, yml, files))


def test_missing_yaml_and_not_a_folder(tmp_path):
    d = tmp_path / "X_infer"
    d.mkdir()
    (d / "inference.json").write_bytes(b"")
    (d / "inference.pdiparams").write_bytes(b"")
    with pytest.raises(PaddleXImportError, match=r"inference.yml: not found"):
        read_folder(d)
    with pytest.raises(PaddleXImportError, match=r"not a directory"):
        read_folder(tmp_path / "nope")


def test_cli_error_is_one_line_and_leaves_nothing(tmp_path, capsys):
    d = _folder(tmp_path, GOOD_YML, files=("inference.pdiparams",))
    assert export_cli(["paddlex", str(d), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tsad-export: error: ") and "no Paddle program" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["M_infer"]


@pytest.mark.skipif(importlib.util.find_spec("paddle2onnx") is not None,
                    reason="paddle2onnx is installed in this environment")
def test_cli_without_paddle2onnx_says_where_to_get_it(tmp_path, capsys):
    d = _folder(tmp_path, GOOD_YML)
    assert export_cli(["paddlex", str(d), "--out", str(tmp_path / "m.onnx")]) == 1
    err = capsys.readouterr().err
    assert "paddle2onnx is not installed" in err and "paddle_env.sh" in err
    assert not (tmp_path / "m.onnx").exists()
