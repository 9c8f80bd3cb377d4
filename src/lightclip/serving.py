"""A saved lightclip model as an MLflow pyfunc, logged as "models from code" (no pickled objects).

:class:`Embedder` is the engine (usable without MLflow), :class:`LightclipPyfunc` the pyfunc that
``lightclip register`` logs with every model; the model's code file,
:mod:`lightclip.registry.model_code`, sets it once the package the model carries is importable.
The weights travel as the artifact ``model`` (the saved model directory: ``model.safetensors`` +
``model.json`` with the open_clip config, tokenizer settings and image mean/std) and the
``lightclip`` package source as one archive in ``code_paths``, so a registered version loads in a
fresh environment from its own files.

Input (the signature): a pandas DataFrame with a ``text`` column (product titles) and/or an
``image`` column (an encoded image file, PNG, JPEG, WebP ..., as a base64 string; in-process
callers may pass the raw ``bytes`` instead). Every row holds exactly one of the two (the other
is null), so one call can mix titles and images, over the REST API too. The image column is a
base64 ``string`` rather than MLflow's ``binary`` type because MLflow's REST input conversion
cannot decode a null in a binary column, which would forbid mixed requests.

Runtime: a model directory carrying an ONNX export (``onnx/``, made by ``lightclip export-onnx``
or shipped by ``lightclip register`` with ``register.runtime: onnx``) is run on ONNX Runtime, the
runtime its registered latency was measured on; otherwise on PyTorch. The export is checked
against the weights' sha256 and its own files' before use: a mismatch is an error, never
vectors from other weights.

Output: a float32 array ``n x embed_dim``, row ``i`` the L2-normalised embedding of row ``i``.
Titles and images share one space: the cosine similarity of a title and an image is the dot
product of their rows. Images are preprocessed exactly as in evaluation (RGB, shortest side to
the model's input size with bicubic filtering, centre crop, the model's mean/std); titles are
tokenised by the model's own tokenizer and truncated to its context as in evaluation.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pandas as pd
import torch

from lightclip.errors import LightclipError
from lightclip.evaluation import embed_images, embed_texts, tokenize_checked
from lightclip.imagecache import ImageCacheError, decode_image, resize_mode_of
from lightclip.models.zoo import load_model, load_tokenizer, preprocess_config

try:  # the engine works without MLflow; the pyfunc class needs it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency of lightclip
    PythonModel = object  # type: ignore[assignment,misc]

TEXT_COLUMN = "text"
IMAGE_COLUMN = "image"
#: The name of the model directory among the logged model's artifacts.
MODEL_ARTIFACT = "model"
#: ``auto``: ONNX Runtime when the model directory carries an export, else PyTorch; ``onnx-int8``:
#: the export's int8 graphs (faster, recall measured by ``lightclip bench``), asked for explicitly.
RUNTIME_CHOICES = ("auto", "torch", "onnx", "onnx-int8")
#: Where an ONNX export sits in a model directory (``lightclip.models.onnx_runtime.RUNTIME_DIR``,
#: which is not imported here: ONNX Runtime loads only for the models that carry an export).
ONNX_RUNTIME_FILE = Path("onnx") / "runtime.json"


class ServingError(LightclipError, ValueError):
    """Input the model cannot embed; the message names the row and the column."""


def _missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(isinstance(value, float) and np.isnan(value))
    except TypeError:
        return False


def image_bytes(value: Any, row: int) -> bytes:
    """The encoded image of one ``image`` cell: bytes as given, or a base64 string decoded."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ServingError(f"row {row}: column '{IMAGE_COLUMN}' is a string but not base64 (send encoded image bytes)") from None
    raise ServingError(f"row {row}: column '{IMAGE_COLUMN}' must hold encoded image bytes, got {type(value).__name__}")


def carries_onnx(model_dir: Path | str) -> bool:
    """Whether ``model_dir`` holds an ONNX export (checked against the weights only when loaded)."""
    return (Path(model_dir) / ONNX_RUNTIME_FILE).is_file()


def serving_runtime(model_dir: Path | str, runtime: str = "auto") -> Literal["torch", "onnx", "onnx-int8"]:
    """The runtime ``model_dir`` is served on: ``auto`` follows what the directory carries."""
    if runtime not in RUNTIME_CHOICES:
        raise ServingError(f"unknown runtime {runtime!r}: expected one of {', '.join(RUNTIME_CHOICES)}")
    if runtime == "auto":
        return "onnx" if carries_onnx(model_dir) else "torch"
    if runtime.startswith("onnx") and not carries_onnx(model_dir):
        raise ServingError(f"{model_dir}: runtime {runtime} was asked for but the model carries no ONNX export ({ONNX_RUNTIME_FILE} missing); "
                           f"export it (`lightclip export-onnx --model {model_dir}`), register it with register.runtime: onnx, or use runtime auto/torch")
    return runtime  # type: ignore[return-value]


def load_serving_model(model_dir: Path | str, runtime: str = "auto", *, threads: int | None = None) -> tuple[torch.nn.Module, str]:
    """The model in ``model_dir`` on its serving runtime (:func:`serving_runtime`), and that runtime.

    ``threads``: ONNX Runtime's intra-op threads (default: torch's current setting, so the
    service's ``serve.threads`` applies to both runtimes).
    """
    chosen = serving_runtime(model_dir, runtime)
    if chosen == "torch":
        return load_model(model_dir), chosen
    # imported here: onnx and onnxruntime (about 45 ms to import) load only for the models that carry an export
    from lightclip.models.onnx_runtime import load_runtime_model

    # an export that is not these weights', or int8 graphs this CPU would get wrong, raise RuntimeMismatchError naming the file
    return load_runtime_model(model_dir, chosen, threads=threads or torch.get_num_threads()), chosen


class Embedder:
    """One saved model, ready to embed titles and encoded images (what the pyfunc serves).

    ``runtime``: ``auto`` (ONNX Runtime when the directory carries an export, else PyTorch),
    ``torch`` or ``onnx``; :attr:`runtime` says which one runs.
    """

    def __init__(self, model_dir: Path | str, batch_size: int = 64, *, runtime: str = "auto", threads: int | None = None) -> None:
        self.model_dir = Path(model_dir)
        self.model, self.runtime = load_serving_model(self.model_dir, runtime, threads=threads)
        self.model.eval()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.preprocess = preprocess_config(self.model)
        self.resize_mode = resize_mode_of(self.preprocess)  # the model's own, from its model.json
        self.batch_size = batch_size
        self._dim: int | None = None

    @property
    def embed_dim(self) -> int:
        if self._dim is None:
            self._dim = int(self.embed_texts(["a"]).shape[1])
        return self._dim

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalised float32 embeddings of titles (the evaluation's tokenisation and encoder)."""
        tokens, _ = tokenize_checked(self.tokenizer, [str(t) for t in texts])
        return embed_texts(self.model, tokens, self.batch_size).numpy().astype(np.float32, copy=False)

    def decode(self, data: bytes, row: int = 0) -> np.ndarray:
        """One encoded image as the uint8 ``3 x S x S`` array the model sees (as in the image cache)."""
        try:
            return decode_image(io.BytesIO(data), int(self.preprocess["size"]), resize_mode=self.resize_mode)  # type: ignore[arg-type]
        except ImageCacheError as exc:
            raise ServingError(f"row {row}: column '{IMAGE_COLUMN}': {str(exc).split(': ', 1)[-1]}") from None

    def embed_uint8(self, images: np.ndarray) -> np.ndarray:
        """L2-normalised float32 embeddings of uint8 ``N x 3 x S x S`` images."""
        return embed_images(self.model, images, self.batch_size).numpy()

    def embed_images(self, images: Sequence[bytes]) -> np.ndarray:
        """L2-normalised float32 embeddings of encoded image files."""
        return self.embed_uint8(np.stack([self.decode(data, i) for i, data in enumerate(images)]))

    def embed_frame(self, frame: Any) -> np.ndarray:
        """The pyfunc contract: one embedding per row, from its ``text`` or its ``image``."""
        if isinstance(frame, dict):
            frame = pd.DataFrame(frame)
        if isinstance(frame, (list, tuple)) and all(isinstance(t, str) for t in frame):
            frame = pd.DataFrame({TEXT_COLUMN: list(frame)})
        if not isinstance(frame, pd.DataFrame):
            raise ServingError(f"expected a DataFrame with columns '{TEXT_COLUMN}' and/or '{IMAGE_COLUMN}', got {type(frame).__name__}")
        unknown = sorted(set(map(str, frame.columns)) - {TEXT_COLUMN, IMAGE_COLUMN})
        if unknown or not len(frame.columns):
            raise ServingError(f"unknown column(s) {unknown}; send '{TEXT_COLUMN}' (titles) and/or '{IMAGE_COLUMN}' (encoded image bytes)")
        n = len(frame)
        texts = frame[TEXT_COLUMN].tolist() if TEXT_COLUMN in frame.columns else [None] * n
        images = frame[IMAGE_COLUMN].tolist() if IMAGE_COLUMN in frame.columns else [None] * n
        text_rows, image_rows, image_data = [], [], []
        for i, (text, image) in enumerate(zip(texts, images)):
            has_text, has_image = not _missing(text), not _missing(image)
            if has_text == has_image:
                which = "both" if has_text else "neither"
                raise ServingError(f"row {i}: has {which} of '{TEXT_COLUMN}' and '{IMAGE_COLUMN}'; give exactly one per row")
            if has_text:
                if not isinstance(text, str):
                    raise ServingError(f"row {i}: column '{TEXT_COLUMN}' must be a string, got {type(text).__name__}")
                text_rows.append(i)
            else:
                image_rows.append(i)
                image_data.append(image_bytes(image, i))
        out = np.zeros((n, self.embed_dim), dtype=np.float32)
        if text_rows:
            out[text_rows] = self.embed_texts([texts[i] for i in text_rows])
        if image_rows:  # decoded here so that an error names the row of the frame
            out[image_rows] = self.embed_uint8(np.stack([self.decode(data, row) for row, data in zip(image_rows, image_data)]))
        return out


class LightclipPyfunc(PythonModel):  # type: ignore[misc,valid-type]
    """The pyfunc: loads the ``model`` artifact once, embeds DataFrames (see the module doc)."""

    def load_context(self, context: Any) -> None:
        # the runtime the version was registered (and its latency gated) on: ONNX Runtime when it carries an export
        self.embedder = Embedder(context.artifacts[MODEL_ARTIFACT])

    # ``pd.DataFrame`` is a hint MLflow 3 accepts without inferring a second signature from it:
    # the explicit signature logged with the model stays the contract.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        return self.embedder.embed_frame(model_input)

