"""Lazy models: a skeleton on the meta device, filled tensor by tensor from its checkpoint.

A :class:`TensorSource` reads one tensor of a checkpoint at a time: sharded safetensors (the
index's shards, each header checked against its file's size on opening) or a GGUF file
(dequantized tensor by tensor, with the names, shapes and permutations transformers' GGUF loader
gives). A :class:`LazyModel` holds the model built from its config with every parameter on the
meta device; :meth:`LazyModel.materialize` reads the parameters under a prefix (a block, the
embeddings) onto a device and :meth:`LazyModel.release` drops them again, so a block's weights
exist only while it is worked on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from llmc.core.safetensors import SafetensorsFile, drop_cache
from llmc.models.loading import ModelSource, stored_dtype
from llmc.models.moe import (
    checkpoint_renames,
    to_checkpoint_name,
    unfuse_experts,
    unsupported_conversion,
)

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


class TensorSource(Protocol):
    """The tensors of one checkpoint, by their names in the HF state dict."""

    files: list[Path]

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def stored_dtype(self, name: str) -> torch.dtype: ...

    def nbytes(self, name: str) -> int: ...

    def read(self, name: str) -> Tensor: ...

    def drop_cache(self, name: str) -> None:
        """The OS may forget its cached pages of ``name``: this run will not read it soon."""
        ...


def files_fingerprint(files: list[Path]) -> list[dict[str, Any]]:
    """Name, size and modification time of each file (hashing a 13 GB checkpoint would cost
    as much as reading it)."""
    out = []
    for f in files:
        st = f.stat()
        out.append({"file": f.name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class SafetensorsSource:
    """The safetensors files of a model directory: the shards its index names, else every
    ``*.safetensors`` file. A shard the index names but the directory lacks, or a truncated
    file, is refused here, before any work."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        d = Path(directory)
        index = d / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index} is not a safetensors index ({e}); download the model "
                                 "again") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise ValueError(
                    f"{missing[0]} is named in {index.name} but missing from {d}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; download "
                    "the model again"
                )
        else:
            shards = sorted(p.name for p in d.glob("*.safetensors"))
            weight_map = None
        if not shards:
            bins = sorted(p.name for p in d.glob("*.bin"))
            hint = (f" (it has {bins[0]}: llmc never unpickles a checkpoint; convert it to "
                    "safetensors first)" if bins else "")
            raise ValueError(f"{d} holds no .safetensors files{hint}")
        self.files = [d / s for s in shards]
        self._files = {s: SafetensorsFile(d / s) for s in shards}
        self._where: dict[str, SafetensorsFile] = {}
        for s, f in self._files.items():
            for name in f.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name} is in both {self._where[name].path.name} "
                                     f"and {s}; the checkpoint is inconsistent")
                self._where[name] = f
        if weight_map is not None:
            absent = [n for n, s in weight_map.items() if n not in self._files[s].entries]
            if absent:
                raise ValueError(f"{weight_map[absent[0]]} lacks {absent[0]}, which {INDEX_FILE} "
                                 "places there; download the model again")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._where[name].dtype(name)

    def nbytes(self, name: str) -> int:
        return self._where[name].nbytes(name)

    def read(self, name: str) -> Tensor:
        return self._where[name].map(name)

    def drop_cache(self, name: str) -> None:
        self._where[name].drop_cache(name)


class GGUFSource:
    """The tensors of a GGUF file, dequantized one at a time to float32, named and shaped as
    transformers' GGUF loader names and shapes them (its tensor processors undo llama.cpp's
    permutations). The file's bytes are read with ``preadv``, not through the reader's memory
    map."""

    def __init__(self, path: str | os.PathLike[str], skeleton: nn.Module) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            read_field,
        )

        self.path = Path(path)
        self.files = [self.path]
        reader = GGUFReader(str(self.path))
        arch = read_field(reader, "general.architecture")[0]
        # The processors read the model's config: the one the skeleton was built from (what
        # transformers' GGUF loader would parse again, with the tokenizer, at seconds and
        # tens of MB of Python objects).
        parsed = {"config": skeleton.config.to_dict(), "tensors": {}}
        self._processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        self._parsed = parsed
        try:
            mapping = get_gguf_hf_weights_map(skeleton, self._processor)
        except NotImplementedError as e:
            raise ValueError(f"{self.path}: {e}") from None
        self._mapping = mapping
        self._tensors: dict[str, Any] = {}
        for t in reader.tensors:
            if t.name in mapping:
                self._tensors[mapping[t.name]] = t
        size = self.path.stat().st_size
        for name, t in self._tensors.items():
            if int(t.data_offset) + int(t.n_bytes) > size:
                raise ValueError(f"{self.path} is truncated: tensor {name} ends past the file's "
                                 f"{size} bytes; download or copy it again")

    def names(self) -> list[str]:
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        t = self._tensors[name]
        return tuple(int(s) for s in reversed(t.shape.tolist()))

    def stored_dtype(self, name: str) -> torch.dtype:
        return torch.float32

    def nbytes(self, name: str) -> int:
        return int(self._tensors[name].n_bytes)

    def read(self, name: str) -> Tensor:
        from gguf import dequantize

        t = self._tensors[name]
        raw = np.empty(int(t.n_bytes), dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            view, done = memoryview(raw), 0
            while done < len(view):
                got = os.preadv(f.fileno(), [view[done:]], int(t.data_offset) + done)
                if got <= 0:
                    raise ValueError(f"{self.path}: unexpected end of file reading {name}")
                done += got
        data = raw.view(t.data.dtype).reshape(t.data.shape)
        weights = dequantize(data, t.tensor_type)
        result = self._processor.process(weights=weights, name=t.name,
                                         tensor_key_mapping=self._mapping,
                                         parsed_parameters=self._parsed)
        if result.name != t.name:
            raise ValueError(f"{self.path}: the GGUF tensor {t.name} maps onto several model "
                             "tensors, which llmc cannot stream yet; load this model whole")
        return torch.from_numpy(np.ascontiguousarray(result.weights)).reshape(self.shape(name))

    def drop_cache(self, name: str) -> None:
        t = self._tensors[name]
        drop_cache(self.path, int(t.data_offset), int(t.n_bytes))


def skeleton(config: Any, trust_remote_code: bool = False) -> nn.Module:
    """The causal LM of ``config`` with its parameters on the meta device and its buffers
    computed on the CPU (as its own init computes them), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()  # an empty-weights init leaves a tied head untied
    unfuse_experts(model, config.model_type)  # MoE: per-expert Linears, as checkpoints hold
    return model.eval()


def open_lazy(src: ModelSource, config: Any, trust_remote_code: bool = False) -> LazyModel:
    """The lazy model of a resolved source and its config: files checked, nothing read."""
    why = None if src.gguf_file else unsupported_conversion(config.model_type)
    if why:
        raise ValueError(
            f"'{config.model_type}' checkpoints are converted by transformers while they load "
            f"({why}), which llmc cannot stream yet; load the model with "
            "llmc.models.load_model and compress it resident"
        )
    declared = stored_dtype(getattr(config, "dtype", None))  # before the skeleton sets float32
    model = skeleton(config, trust_remote_code)
    model.config.dtype = declared
    return LazyModel(model, open_source(src, model), declared)


def open_source(src: ModelSource, skeleton: nn.Module) -> TensorSource:
    """The tensor source of a resolved model: its GGUF file or its safetensors files (a hub id
    is downloaded, safetensors and JSON only)."""
    if src.gguf_file:
        return GGUFSource(Path(src.path) / src.gguf_file, skeleton)
    path = Path(src.path)
    if not path.is_dir():
        path = _hub_snapshot(src.path)
    return SafetensorsSource(path)


def _hub_snapshot(repo: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # the hub raises many kinds (offline, missing repo, auth)
        raise ValueError(f"cannot download the safetensors files of '{repo}': {e}") from None


class LazyModel:
    """``model``: a :func:`skeleton` (parameters on the meta device) filled from ``source`` on
    demand; ``save_dtype``: the dtype the checkpoint declares for its weights. Every parameter
    is checked against the source (present, same shape) on construction, before any work."""

    def __init__(self, model: nn.Module, source: TensorSource,
                 save_dtype: torch.dtype = torch.float32) -> None:
        self.config = model.config
        self.source = source
        self.save_dtype = save_dtype
        self.model = model
        # every name of every parameter (tied ones share one tensor and one checkpoint entry)
        groups: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(p), []).append(name)
        have = set(source.names())
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        renames = checkpoint_renames(getattr(model.config, "model_type", None))
        self._key: dict[str, str] = {}  # parameter name -> checkpoint name
        missing = []
        for names in groups.values():
            key = next((k for n in names for k in (n, n.removeprefix(prefix),
                                                   to_checkpoint_name(n, renames))
                        if k in have), None)
            if key is None:
                missing.append(names[0])
                continue
            for n in names:
                self._key[n] = key
        if missing:
            raise ValueError(
                f"the checkpoint lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); "
                "is it the checkpoint of this config?"
            )
        for name, p in model.named_parameters(remove_duplicate=False):
            shape = tuple(source.shape(self._key[name]))
            if shape != tuple(p.shape):
                raise ValueError(f"{self._key[name]} has shape {shape} in the checkpoint but "
                                 f"{tuple(p.shape)} in the model built from its config")
        self._load_buffers()

    def _load_buffers(self) -> None:
        """Persistent buffers the checkpoint holds (the skeleton computed the others)."""
        have = set(self.source.names())
        for name, buf in self.model.state_dict().items():
            if name in self._key or name not in have:
                continue
            owner, _, attr = name.rpartition(".")
            module = self.model.get_submodule(owner)
            module._buffers[attr] = self.source.read(name).to(buf.dtype)

    def parameter_names(self, prefix: str = "") -> list[str]:
        return [n for n in self._key if n.startswith(prefix)]

    def checkpoint_name(self, name: str) -> str:
        return self._key[name]

    def _slots(self, prefix: str):
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for attr, p in list(module._parameters.items()):
                full = f"{module_name}.{attr}" if module_name else attr
                if p is not None and full.startswith(prefix):
                    yield full, module, attr

    def read(self, prefix: str) -> dict[str, Tensor]:
        """The checkpoint's tensors of the parameters under ``prefix``, as stored (CPU), by
        checkpoint name: what :meth:`materialize` would read (a prefetch reads it ahead)."""
        keys = dict.fromkeys(self._key[full] for full, _, _ in self._slots(prefix))
        return {k: self.source.read(k) for k in keys}

    def materialize(self, prefix: str, device: torch.device | str = "cpu",
                    dtype: torch.dtype | None = torch.float32,
                    tensors: dict[str, Tensor] | None = None) -> None:
        """Read every parameter under ``prefix`` from the checkpoint (or take it from
        ``tensors``, a :meth:`read` made earlier) onto ``device`` as ``dtype`` (None: as
        stored); a tied parameter is read once and placed in all its slots."""
        read: dict[str, nn.Parameter] = {}
        for full, module, attr in self._slots(prefix):
            key = self._key[full]
            if key not in read:
                t = tensors.pop(key) if tensors is not None else self.source.read(key)
                t = t.to(device=device, dtype=dtype or t.dtype)
                read[key] = nn.Parameter(t, requires_grad=module._parameters[attr].requires_grad)
            module._parameters[attr] = read[key]
        self._retie(read)

    def _retie(self, read: dict[str, nn.Parameter]) -> None:
        """Slots outside the prefix that share a checkpoint tensor just read (a head tied to
        the embeddings) point at the same parameter."""
        if not read:
            return
        for full, module, attr in self._slots(""):
            key = self._key[full]
            if key in read and module._parameters[attr] is not read[key]:
                module._parameters[attr] = read[key]

    def release(self, prefix: str) -> None:
        """Every parameter under ``prefix`` back to the meta device (its memory freed), and
        its checkpoint pages out of the OS's cache: a streamed walk reads each block once,
        and the pages it frees are the ones the next block's reads take."""
        metas: dict[str, nn.Parameter] = {}
        for full, module, attr in self._slots(prefix):
            key = self._key[full]
            p = module._parameters[attr]
            if key not in metas:
                metas[key] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device="meta"),
                                          requires_grad=p.requires_grad)
            module._parameters[attr] = metas[key]
        for full, module, attr in self._slots(""):
            if self._key[full] in metas:
                module._parameters[attr] = metas[self._key[full]]
        for key in metas:
            self.source.drop_cache(key)

    def read_bytes(self) -> int:
        """Bytes per weight of the largest tensor as the source reads it (GGUF: float32)."""
        key = max(set(self._key.values()),
                  key=lambda k: math.prod(self.source.shape(k)), default=None)
        return self.source.stored_dtype(key).itemsize if key is not None else 4

    def bytes_on_disk(self) -> int:
        return sum(self.source.nbytes(k) for k in set(self._key.values()))

    def fingerprint(self) -> dict[str, Any]:
        cfg = json.dumps(self.config.to_dict(), sort_keys=True, default=str)
        return {"config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
                "files": files_fingerprint(self.source.files)}
