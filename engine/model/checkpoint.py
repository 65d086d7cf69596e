"""Checkpoint -> per-layer weight store, converted once, read directly by the disk tier.

A store is a directory with one file per engine layer ("embed", "decoder.0" ... , "head") and an
index.json. Each tensor starts at a 4 KiB boundary and is padded to one, so the disk tier can read
it with O_DIRECT. Tensors are fp16 (the checkpoint's own precision for OPT). The output head holds
its own copy of the tied token embedding so every layer's file is self-contained.
"""
from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from engine.runtime.compression import quantize, to_bytes
from engine.errors import CheckpointError
from engine.model import llama_config
from engine.model.config import ModelConfig, layer_tensor_shapes
from engine.model.llama_config import LlamaConfig
from engine.runtime.policy import CompressionConfig
from engine.runtime.tiers import align_up

STORE_VERSION = 1


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int  # unpadded bytes as stored (fp16, or the packed 4-bit form)
    num_bits: int = 16  # 16: plain fp16; else group-wise quantised (engine.runtime.compression.to_bytes layout)
    group_size: int = 0

    @property
    def compressed(self) -> bool:
        return self.num_bits < 16

    def compute_bytes(self, element_size: int) -> int:
        """Bytes of the tensor once ready for the math (dequantised / converted)."""
        n = 1
        for s in self.shape:
            n *= s
        return n * element_size

    def held_bytes(self, element_size: int) -> int:
        """Bytes a resident copy takes: compressed tensors stay packed in memory."""
        return self.nbytes if self.compressed else self.compute_bytes(element_size)


def layer_names(cfg: ModelConfig) -> list[str]:
    return ["embed"] + [f"decoder.{i}" for i in range(cfg.num_layers)] + ["head"]


def layer_tensor_specs(cfg: ModelConfig, layer: str) -> list[tuple[str, tuple[int, ...]]]:
    """(engine tensor name, shape) of one engine layer, in store order."""
    if isinstance(cfg, LlamaConfig):
        return llama_config.store_tensor_specs(cfg, layer)
    h, e = cfg.hidden_size, cfg.embed_dim
    if layer == "embed":
        specs = [("embed_tokens.weight", (cfg.vocab_size, e)),
                 ("embed_positions.weight", (cfg.max_positions + 2, h))]
        return specs + ([("project_in.weight", (h, e))] if cfg.has_projections else [])
    if layer == "head":
        specs = [("lm_head.weight", (cfg.vocab_size, e))]
        if cfg.has_final_layer_norm:
            specs += [("final_layer_norm.weight", (h,)), ("final_layer_norm.bias", (h,))]
        return specs + ([("project_out.weight", (e, h))] if cfg.has_projections else [])
    return layer_tensor_shapes(cfg)


def _checkpoint_name(cfg: ModelConfig, layer: str, name: str) -> str:
    if isinstance(cfg, LlamaConfig):
        return llama_config.checkpoint_name(cfg, layer, name)
    if layer == "head" and name == "lm_head.weight":
        return "model.decoder.embed_tokens.weight"  # tied
    if layer.startswith("decoder."):
        return f"model.decoder.layers.{layer.split('.')[1]}.{name}"
    return f"model.decoder.{name}"


class CheckpointReader:
    """Reads tensors by HF name from safetensors (single or sharded) or pytorch .bin files.

    `.bin` files go through torch.load(weights_only=True) only: never a pickle with code in it.
    Names with or without the "model." prefix (older facebook/opt checkpoints) are accepted.
    """

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._where: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        self._bin_cache: dict[Path, dict] = {}
        st = sorted(model_dir.glob("*.safetensors"))
        bins = sorted(model_dir.glob("pytorch_model*.bin"))
        if not st and not bins:
            raise CheckpointError(f"{model_dir} has no *.safetensors or pytorch_model*.bin weight files")
        for path in st or bins:
            for key in self._keys(path):
                self._where[self._normalise(key)] = path

    @staticmethod
    def _normalise(key: str) -> str:
        if key.startswith("decoder."):
            return "model." + key
        return key

    def _keys(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._safe(path).keys())
        return list(self._load_bin(path).keys())

    def _safe(self, path: Path):
        from safetensors import safe_open

        if path not in self._open:
            try:
                self._open[path] = safe_open(str(path), framework="pt")
            except Exception as exc:  # truncated or not a safetensors file
                raise CheckpointError(f"cannot read {path}: {exc}") from None
        return self._open[path]

    def _load_bin(self, path: Path) -> dict:
        if path not in self._bin_cache:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise CheckpointError(f"cannot read {path} (weights_only load): {exc}") from None
            self._bin_cache[path] = {self._normalise(k): v for k, v in state.items()}
        return self._bin_cache[path]

    def get(self, hf_name: str) -> torch.Tensor:
        path = self._where.get(hf_name)
        if path is None:
            raise CheckpointError(f"{self.model_dir}: the checkpoint has no tensor {hf_name!r}")
        try:
            if path.suffix == ".safetensors":
                f = self._safe(path)
                key = hf_name if hf_name in f.keys() else hf_name.removeprefix("model.")
                return f.get_tensor(key)
            return self._load_bin(path)[hf_name]
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {hf_name} from {path}: {exc}") from None


def checkpoint_fingerprint(model_dir: Path) -> str:
    """Identifies a checkpoint by its config and the names, sizes and mtimes of its weight files."""
    digest = hashlib.sha256((model_dir / "config.json").read_bytes())
    for path in sorted(model_dir.iterdir()):
        if path.suffix in (".safetensors", ".bin") or path.name.endswith(".index.json"):
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


class WeightStore:
    """The converted per-layer store of one checkpoint."""

    def __init__(self, root: Path, index: dict) -> None:
        self.root = root
        self.layers: dict[str, list[TensorEntry]] = {
            layer: [TensorEntry(t["name"], tuple(t["shape"]), t["offset"], t["nbytes"], t.get("num_bits", 16),
                                t.get("group_size", 0)) for t in tensors]
            for layer, tensors in index["layers"].items()}

    def path(self, layer: str) -> Path:
        return self.root / f"{layer}.bin"

    @classmethod
    def open_or_convert(cls, model_dir: Path, cfg: ModelConfig, store_dir: Path,
                        on_layer: Callable[[str, int, int], None] | None = None,
                        compression: CompressionConfig | None = None) -> "WeightStore":
        suffix = f"-q{compression.num_bits}g{compression.group_size}" if compression else ""
        root = store_dir / "weights" / (checkpoint_fingerprint(model_dir) + suffix)
        store = cls._open_complete(root)
        if store is not None:
            return store
        with _conversion_lock(root):
            # Another process may have converted it while we waited for the lock.
            store = cls._open_complete(root)
            if store is not None:
                return store
            try:
                return cls(root, convert_checkpoint(model_dir, cfg, root, on_layer, compression))
            except BaseException:
                for partial in root.glob("*.tmp"):  # a full disk must not stay full of half-written files
                    partial.unlink(missing_ok=True)
                raise

    @classmethod
    def _open_complete(cls, root: Path) -> "WeightStore | None":
        """The store at `root` if its index and every layer file are complete, else None."""
        index_path = root / "index.json"
        if not index_path.is_file():
            return None
        try:
            index = json.loads(index_path.read_text())
            if index.get("version") == STORE_VERSION and cls._files_complete(root, index):
                return cls(root, index)
        except (json.JSONDecodeError, KeyError):
            pass  # a half-written store: convert again
        return None

    @staticmethod
    def _files_complete(root: Path, index: dict) -> bool:
        for layer, tensors in index["layers"].items():
            end = max((t["offset"] + align_up(t["nbytes"]) for t in tensors), default=0)
            path = root / f"{layer}.bin"
            if not path.is_file() or path.stat().st_size < end:
                return False
        return True


@contextmanager
def _conversion_lock(root: Path):
    """Two processes opening the same model at once convert it once (the second waits)."""
    import fcntl

    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _encode(tensor: torch.Tensor, compression: CompressionConfig | None) -> tuple[bytes, dict]:
    """The stored bytes of one tensor: fp16, or (matrices, with compression) 4-bit group-wise along
    the input dimension, packed as engine.runtime.compression.to_bytes lays it out."""
    if compression is not None and tensor.dim() == 2:
        q = quantize(tensor, num_bits=compression.num_bits, group_size=compression.group_size, dim=-1)
        return to_bytes(q).numpy().tobytes(), {"num_bits": compression.num_bits,
                                               "group_size": compression.group_size}
    return tensor.to(torch.float16).contiguous().view(torch.uint8).numpy().tobytes(), {}


def convert_checkpoint(model_dir: Path, cfg: ModelConfig, root: Path,
                       on_layer: Callable[[str, int, int], None] | None = None,
                       compression: CompressionConfig | None = None) -> dict:
    """Write every layer file (aligned tensors) and then the index (last: marks completion)."""
    reader = CheckpointReader(model_dir)
    root.mkdir(parents=True, exist_ok=True)
    index = {"version": STORE_VERSION, "layers": {}}
    names = layer_names(cfg)
    for i, layer in enumerate(names):
        entries, offset = [], 0
        with open(root / f"{layer}.bin.tmp", "wb") as f:
            for name, shape in layer_tensor_specs(cfg, layer):
                tensor = reader.get(_checkpoint_name(cfg, layer, name))
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(f"{model_dir}: tensor {_checkpoint_name(cfg, layer, name)} has shape "
                                          f"{tuple(tensor.shape)}, config.json implies {shape}")
                data, fmt = _encode(tensor, compression)
                f.write(data)
                f.write(b"\0" * (align_up(len(data)) - len(data)))
                entries.append({"name": name, "shape": list(shape), "offset": offset, "nbytes": len(data), **fmt})
                offset += align_up(len(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(root / f"{layer}.bin.tmp", root / f"{layer}.bin")
        index["layers"][layer] = entries
        if on_layer:
            on_layer(layer, i + 1, len(names))
    (root / "index.json").write_text(json.dumps(index))
    return index
