"""One ONNX reconstruction model behind an onnxruntime session.

Loading checks everything the model contract promises before the first sample
arrives: the sha256 in the metadata, that ORT can parse the graph, that the
graph's input/output names and shapes agree with the metadata's window and
channels, and that a warm-up run returns the promised shape.  Any failure is a
`DetectorError` with one clear line, never an ORT traceback.
"""
from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from .config import ModelConfig
from .metrics import Metrics
from .model_meta import ModelMeta, ModelMetaError, load_meta, sha256_file
from .providers import CPU, resolve

log = logging.getLogger(__name__)

# ORT errors that mean the file itself is bad: no other provider will do better.
EXTERNAL_DATA_DIR = "session.model_external_initializers_file_folder_path"
_MODEL_ERRORS = (ort_state.InvalidProtobuf, ort_state.InvalidGraph, ort_state.InvalidArgument,
                 ort_state.NoSuchFile, ort_state.NoModel)


class DetectorError(RuntimeError):
    """The model cannot be loaded or run; the message says why."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _provider_failure(e: BaseException) -> str:
    """Why a provider failed to start, in one line.  ORT puts its own call frames first and
    the provider's reason last (OpenVINO: "...core.cpp:114:\n...plugin.cpp:53:\ncan't
    protect"), so a message of several lines is summed up by its last."""
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    why = lines[-1] if lines else type(e).__name__
    if why == "can't protect":
        # OpenVINO's CPU plugin compiles its kernels at load; mprotect(PROT_EXEC) refused
        why += (": executable memory is denied (systemd MemoryDenyWriteExecute=yes); "
                "the OpenVINO provider needs the drop-in MemoryDenyWriteExecute=no")
    return why


def _session_settings(model: ModelConfig) -> tuple:
    """What of a `model:` section a loaded detector is made of (batch_wait_s and policy
    act elsewhere)."""
    return (model.path, tuple(model.providers), model.threads, model.verify_checksum,
            model.max_batch)


# ORT prints each failed run on stderr itself, in colour and unthrottled; the failure is
# raised (DetectorError) and the engine logs it (agent/model_call.py)
_QUIET = ort.RunOptions()
_QUIET.log_severity_level = 4

class Detector:
    def __init__(self, model_path: str, providers: list[str] = ["cpu"], threads: int = 1,
                 verify_checksum: bool = True, max_batch: int = 64,
                 metrics: Metrics | None = None,
                 provider_options: dict[str, dict] | None = None) -> None:
        self.path = Path(model_path)
        self.config: ModelConfig | None = None     # the config section it was built from
        self.max_batch = max(1, int(max_batch))
        self.metrics = metrics
        try:
            self.meta: ModelMeta = load_meta(self.path, verify_checksum=False)
            blob = self.path.read_bytes()
        except ModelMetaError as e:
            raise DetectorError(str(e)) from None
        except OSError as e:
            raise DetectorError(f"{self.path}: cannot read: {e.strerror}") from None
        # Hash the very bytes handed to ORT, so a file swapped after the check cannot load.
        self.loaded_sha256 = hashlib.sha256(blob).hexdigest()
        if verify_checksum:
            actual = self.loaded_sha256
            if actual != self.meta.onnx_sha256:
                raise DetectorError(
                    f"{self.path}: sha256 {actual[:16]}... does not match metadata "
                    f"{self.meta.onnx_sha256[:16]}... (file corrupt or tampered; refusing to load)")
        self.window = self.meta.window
        self.n_channels = self.meta.n_channels
        self._in = self.meta.input_name
        self._out = self.meta.output_name
        self.session = self._open(blob, providers, threads, provider_options)
        self.ep: str = self.session.get_providers()[0]
        self.fixed_batch = self._check_graph()
        self._warm_up()
        log.info("model %s (%s, window %d, %d channels) on %s%s", self.meta.name,
                 self.meta.architecture, self.window, self.n_channels, self.ep,
                 f", fixed batch {self.fixed_batch}" if self.fixed_batch else "")

    # ------------------------------------------------------------ loading

    @classmethod
    def from_config(cls, model: ModelConfig, metrics: Metrics | None = None) -> "Detector":
        """The detector a config's `model:` section asks for."""
        det = cls(model.path, providers=list(model.providers), threads=model.threads,
                  verify_checksum=model.verify_checksum, max_batch=model.max_batch,
                  metrics=metrics)
        det.config = model
        return det

    def serves(self, model: ModelConfig) -> bool:
        """Whether `model` asks for this detector as it stands: the same settings, and the
        same model and metadata on disk. A reload that changed neither need not load the
        model again, which takes minutes for a large model or TensorRT on a small board.
        One that fell back from the provider asked for first is loaded again: a reload is
        how a user retries the GPU."""
        if self.config is None or _session_settings(model) != _session_settings(self.config) \
                or self.ep != self.preferred_ep:
            return False
        try:
            meta = load_meta(self.path, verify_checksum=False)
            return meta == self.meta and sha256_file(self.path) == self.loaded_sha256
        except (ModelMetaError, OSError):
            return False    # the full load that follows says what is wrong

    def _session_options(self, threads: int) -> ort.SessionOptions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        # One model, one request at a time: a second pool only adds wake-ups.
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's memory pattern plans one block per input shape and keeps every plan; the
        # engine sends many batch sizes (1..max_batch), so the plans pile up (11 MB for
        # Nonstationary_ad), while the arena serves the same tensors without them.
        so.enable_mem_pattern = False
        # A pool thread busy-waits for work after each run: with model.threads 0 or 2, 4
        # streams at 10 Hz took 6x the CPU, and 40 runs a second 60x (ORT audit, twenty-
        # second session); without it a run costs about 0.05 ms more.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        return so

    def _with_hints(self, chain: list[tuple[str, dict]], threads: int) -> list[tuple[str, dict]]:
        # Without an optimisation profile TensorRT rebuilds its engine for every new
        # batch size; give it the full range we will ever send.  OpenVINO ignores ORT's
        # intra-op setting and runs a thread per core: hold it to model.threads as well.
        out = []
        for ep, opts in chain:
            if ep == "OpenVINOExecutionProvider" and threads > 0 and "num_of_threads" not in opts:
                opts = {**opts, "num_of_threads": str(threads)}
            if ep == "TensorrtExecutionProvider" and "trt_profile_min_shapes" not in opts:
                w, c = self.window, self.n_channels
                opts = {**opts,
                        "trt_profile_min_shapes": f"{self._in}:1x{w}x{c}",
                        "trt_profile_opt_shapes": f"{self._in}:{self.max_batch}x{w}x{c}",
                        "trt_profile_max_shapes": f"{self._in}:{self.max_batch}x{w}x{c}"}
            out.append((ep, opts))
        return out

    def _open(self, blob: bytes, requested: list[str], threads: int,
              provider_options: dict[str, dict] | None) -> ort.InferenceSession:
        chain = self._with_hints(resolve(requested, provider_options), threads)
        self.preferred_ep = chain[0][0]
        for i, (ep, _) in enumerate(chain):
            # Hand ORT the rest of the chain, so nodes the preferred provider cannot
            # run are placed on the next one instead of failing the session.
            rest = chain[i:]
            try:
                # External data files are found from an empty folder, so none is: the
                # sha256 covers the .onnx file alone, and ORT would look for them from the
                # working directory (/ under the unit), where any file could stand in.
                with tempfile.TemporaryDirectory() as nowhere:
                    so = self._session_options(threads)
                    so.add_session_config_entry(EXTERNAL_DATA_DIR, nowhere)
                    sess = ort.InferenceSession(
                        blob, sess_options=so, providers=[p for p, _ in rest],
                        provider_options=[o for _, o in rest])
            except _MODEL_ERRORS as e:
                raise DetectorError(f"{self.path}: not a loadable ONNX model: {_first_line(e)}") from None
            except Exception as e:   # ORT raises bare pybind errors; any other = provider trouble
                if "External data" in str(e):
                    raise DetectorError(
                        f"{self.path}: the model keeps weights in external data files, which its "
                        "sha256 does not cover; tsad-agent loads one self-contained .onnx file "
                        "(export it with the weights inside)") from None
                if ep == CPU:
                    raise DetectorError(
                        f"{self.path}: onnxruntime cannot build a session: {_first_line(e)}") from None
                log.warning("execution provider %s failed to initialise (%s); falling back to %s",
                            ep, _provider_failure(e), chain[i + 1][0])
                log.debug("%s failed with: %s", ep, e)
                continue
            got = sess.get_providers()[0]
            if got != ep:
                # ORT sometimes swallows a provider's start-up failure and silently
                # continues on another one; report what really happened.
                log.warning("execution provider %s failed to initialise; falling back to %s", ep, got)
            return sess
        raise AssertionError("unreachable: CPU is always in the chain")

    def _check_graph(self) -> int | None:
        """Compare graph I/O with the metadata; returns the fixed batch size, or None if dynamic."""
        where = f"{self.path}"
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name: o for o in self.session.get_outputs()}
        if self._in not in inputs:
            raise DetectorError(f"{where}: graph has no input {self._in!r} (metadata input_name); "
                                f"graph inputs: {', '.join(inputs) or 'none'}")
        if len(inputs) != 1:
            raise DetectorError(f"{where}: graph has {len(inputs)} inputs ({', '.join(inputs)}); "
                                f"the runtime feeds exactly one, {self._in!r}")
        if self._out not in outputs:
            raise DetectorError(f"{where}: graph has no output {self._out!r} (metadata output_name); "
                                f"graph outputs: {', '.join(outputs) or 'none'}")
        inp = inputs[self._in]
        if inp.type != "tensor(float)":
            raise DetectorError(f"{where}: input {self._in!r} is {inp.type}, expected tensor(float)")
        fixed = None
        for kind, arg in (("input", inp), ("output", outputs[self._out])):
            shape = arg.shape
            if len(shape) != 3:
                raise DetectorError(f"{where}: {kind} {arg.name!r} has shape {shape}, "
                                    f"expected [batch, window, channels]")
            for axis, (dim, want, label) in enumerate(
                    ((shape[1], self.window, "window"), (shape[2], self.n_channels, "channels")), 1):
                if isinstance(dim, int) and dim != want:
                    raise DetectorError(
                        f"{where}: {kind} {arg.name!r} has {dim} on axis {axis} ({label}), "
                        f"metadata says {label} = {want}; model and metadata do not belong together")
            if kind == "input" and isinstance(shape[0], int) and shape[0] > 0:
                fixed = shape[0]
        if fixed is not None and self.meta.dynamic_batch:
            log.warning("%s: metadata says dynamic_batch but the graph's batch is fixed at %d; "
                        "running %d window(s) per call", where, fixed, fixed)
        return fixed

    def _warm_up(self) -> None:
        b = self.fixed_batch or 1
        x = np.zeros((b, self.window, self.n_channels), np.float32)
        try:
            y = self.session.run([self._out], {self._in: x}, _QUIET)[0]
        except Exception as e:
            raise DetectorError(f"{self.path}: warm-up run failed on {self.ep}: {_first_line(e)}") from None
        if y.shape != x.shape:
            raise DetectorError(f"{self.path}: output {self._out!r} has shape {list(y.shape)} for "
                                f"input {list(x.shape)}; a reconstruction must have the input's shape")
        if not np.isfinite(y).all():
            # a window at the scaler's mean is the most normal input there is: a model that
            # cannot reproduce it would score nothing (tsad-export verify refuses it too)
            raise DetectorError(f"{self.path}: the model returns NaN or infinity for a window at "
                                f"its scaler's mean: it cannot score (tsad-export verify MODEL)")

    # ------------------------------------------------------------ inference
    def _run(self, x: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        try:
            y = self.session.run([self._out], {self._in: x}, _QUIET)[0]
        except Exception as e:
            raise DetectorError(f"inference failed on {self.ep}: {_first_line(e)}") from None
        if self.metrics is not None:
            self.metrics.infer_ms((time.perf_counter() - t0) * 1e3)
        return y

    def infer(self, x: np.ndarray) -> np.ndarray:
        """Reconstruct windows: float32 [B, window, channels] (scaled) -> same shape.

        Runs in chunks of `max_batch` (or the graph's fixed batch, padding the
        last chunk).  Latency goes to `metrics.infer_ms` once per ORT run, i.e.
        per chunk, not per window.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (self.window, self.n_channels):
            raise ValueError(f"expected windows of shape [B, {self.window}, {self.n_channels}], "
                             f"got {list(x.shape)}")
        n = x.shape[0]
        if n == 0:
            return x.copy()
        step = self.fixed_batch or self.max_batch
        if n <= step and (self.fixed_batch is None or n == step):
            return self._run(x)
        out = np.empty_like(x)
        for i in range(0, n, step):
            chunk = x[i:i + step]
            m = chunk.shape[0]
            if self.fixed_batch is not None and m < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - m, axis=0)])
            out[i:i + m] = self._run(chunk)[:m]
        return out
