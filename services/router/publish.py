"""Publishing a version: a folder copied into the repository, once, and never changed.

The copy lands in a temporary folder beside its final place, is fingerprinted there, and is
renamed into place only when it passes every check, so a failed or refused publish leaves
nothing behind and a reader never sees half a version. The same files published again answer
the version that already holds them (idempotent).

A version must be another revision of the same model: the same architecture and shape (workers
of the new version take the same spans), and the same tokenizer, chat template and generation
settings, because the router prepares a request's tokens before it draws the version.
"""

from __future__ import annotations

import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    quoted,
)
from services.common.repository import (
    OUTPUT_FILES,
    VERSIONS_DIR,
    fingerprint,
    model_path,
    model_spec,
    published_versions,
    version_of,
)

_NUMBERED = re.compile(r"v(\d+)")


@dataclass(frozen=True)
class Published:
    label: str
    fingerprint: str
    existed: bool  # the same files were already a version


def version_label(path: Path) -> str:
    """A version folder's label: its VERSION file, else its fingerprint's head."""
    if (path / "VERSION").is_file():
        return (path / "VERSION").read_text().strip()
    return version_of(path, fingerprint(path))


def versions(repository: Path, model: str) -> list[tuple[str, Path]]:
    """(label, folder) of every version of the model: its own folder first."""
    base = model_path(repository, model)
    found = [(version_label(base), base)] if (base / "config.json").is_file() else []
    found += [(p.name, p) for p in published_versions(repository, model)]
    return found


def _same_model(base: Path, new: Path) -> None:
    """Raises FailedPrecondition unless `new` is another revision of `base`'s model."""
    try:
        want = model_spec(base.parent, base.name)
        got = model_spec(new.parent, new.name)
    except (NotFound, ValueError) as exc:
        raise InvalidArgument(f"the source is not a model folder: {exc}") from None
    for name in ("model_type", "kind", "num_layers", "hidden_size"):
        if getattr(got, name) != getattr(want, name):
            raise FailedPrecondition(
                f"the source's {name} is {getattr(got, name)}, the model's is "
                f"{getattr(want, name)}: a version must keep the model's shape"
            )
    for name in OUTPUT_FILES:
        if name == "config.json":
            continue
        a, b = base / name, new / name
        if a.is_file() != b.is_file() or (a.is_file() and a.read_bytes() != b.read_bytes()):
            raise FailedPrecondition(
                f"the source's {name} differs from the model's: a version keeps the model's "
                "tokenizer, chat template and generation settings"
            )


def publish(
    repository: Path, model: str, source: Path, label: str = "", expected: str = ""
) -> Published:
    """Copies `source` into the repository as a version of `model` (blocking: run it in a
    thread). Returns the version's label and fingerprint."""
    base = model_path(repository, model)
    if not (base / "config.json").is_file():
        raise NotFound(f"model {quoted(model)} is not in the model repository")
    if not source.is_dir():
        raise InvalidArgument(f"source {quoted(str(source))} is not a folder on the router's host")
    root = repository / VERSIONS_DIR / model
    root.mkdir(parents=True, exist_ok=True)
    incoming = root / f".incoming-{uuid.uuid4().hex[:12]}"
    try:
        shutil.copytree(source, incoming, ignore=shutil.ignore_patterns("VERSION", ".*"))
        _same_model(base, incoming)
        digest = fingerprint(incoming)
        if expected and expected != digest:
            raise FailedPrecondition(
                f"the source's fingerprint is {digest}, not the expected {quoted(expected, 80)}"
            )
        known = versions(repository, model)
        for existing_label, path in known:
            if fingerprint(path) == digest:
                if label and label != existing_label:
                    raise AlreadyExists(
                        f"these files are already version {existing_label!r} of {model!r}"
                    )
                return Published(existing_label, digest, existed=True)
        label = label or _next_label([existing for existing, _ in known])
        if any(existing == label for existing, _ in known):
            raise AlreadyExists(f"model {model!r} already has a version {label!r}")
        (incoming / "VERSION").write_text(label + "\n")
        incoming.rename(root / label)
        return Published(label, digest, existed=False)
    finally:
        if incoming.exists():
            shutil.rmtree(incoming, ignore_errors=True)


def _next_label(labels: list[str]) -> str:
    numbers = [int(m.group(1)) for label in labels if (m := _NUMBERED.fullmatch(label))]
    return f"v{max(numbers, default=len(labels)) + 1}"
