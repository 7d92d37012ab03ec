"""Settings: the mesh file, the built-in default mesh and TESSERA_* environment overrides."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from services.common.settings import (
    DEFAULT_MESH_YAML,
    MeshSettings,
    RouterSettings,
    WorkerSettings,
    apply,
    apply_env,
    load_mesh,
    load_mesh_file,
)

# The mesh of DESIGN.md, "The built-in default of `tessera up` is exactly this mesh".
DESIGN_MESH_YAML = """\
router: {port: 50051}
cache: {nodes: ["127.0.0.1:11211"]}     # local nodes are launched by `tessera up`
workers:
  - {model: smollm2-135m-instruct, layers: "0:15", port: 50061}
  - {model: smollm2-135m-instruct, layers: "15:30", port: 50062}
  - {model: all-minilm-l6-v2, port: 50063}   # no layers: a replica
"""


@pytest.fixture(autouse=True)
def _no_repository_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TESSERA_MODEL_REPOSITORY", raising=False)


def _workers(mesh: MeshSettings) -> list[tuple[str, str | None, int]]:
    return [(w.model, w.layers, w.port) for w in mesh.workers]


# -- the default mesh ------------------------------------------------------------------------


def test_builtin_default_is_the_design_mesh() -> None:
    mesh = load_mesh_file(None)
    assert mesh.router.port == 50051
    assert mesh.cache_nodes == ["127.0.0.1:11211"]
    assert _workers(mesh) == [
        ("smollm2-135m-instruct", "0:15", 50061),
        ("smollm2-135m-instruct", "15:30", 50062),
        ("all-minilm-l6-v2", None, 50063),
    ]
    assert mesh == load_mesh(DESIGN_MESH_YAML)
    assert mesh == load_mesh(DEFAULT_MESH_YAML)
    # Everything not named in the file keeps its default.
    assert mesh.router == dataclasses.replace(RouterSettings(), port=50051)
    for worker in mesh.workers:
        assert dataclasses.replace(worker, model="", layers=None, port=50061) == WorkerSettings()


def test_default_ports_match_the_design() -> None:
    assert RouterSettings().port == 50051
    assert WorkerSettings().port == 50061
    assert MeshSettings().cache_nodes == ["127.0.0.1:11211"]


def test_mesh_file_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(
        "router: {port: 6000, max_new_tokens: 16}\n"
        "cache: {nodes: ['10.0.0.1:11211', '10.0.0.2:11211']}\n"
        "workers:\n"
        "  - {model: tiny-llama, layers: '0:2', port: 7001, max_rows: 4}\n"
        "  - {model: tiny-llama, layers: '2:4', port: 7002}\n"
    )
    mesh = load_mesh_file(path)
    assert mesh.router.port == 6000 and mesh.router.max_new_tokens == 16
    assert mesh.cache_nodes == ["10.0.0.1:11211", "10.0.0.2:11211"]
    assert _workers(mesh) == [("tiny-llama", "0:2", 7001), ("tiny-llama", "2:4", 7002)]
    assert mesh.workers[0].max_rows == 4 and mesh.workers[1].max_rows == 64


def test_empty_file_and_sections() -> None:
    empty = load_mesh("")
    assert empty == MeshSettings()
    assert empty.workers == [] and empty.cache_nodes == ["127.0.0.1:11211"]
    assert load_mesh("router:\ncache:\nworkers:\n") == MeshSettings()
    assert load_mesh("cache: {nodes: []}").cache_nodes == []


def test_mesh_values_are_coerced_to_their_types() -> None:
    mesh = load_mesh(
        "router: {port: '6001', health_interval_s: 2, workers: 'a:1, b:2'}\n"
        "workers: [{model: m, port: '7001', heartbeat_s: 1, routers: [r:1]}]\n"
    )
    assert mesh.router.port == 6001
    assert mesh.router.health_interval_s == 2.0
    assert isinstance(mesh.router.health_interval_s, float)
    assert mesh.router.workers == ["a:1", "b:2"]
    assert mesh.workers[0].port == 7001 and mesh.workers[0].heartbeat_s == 1.0
    assert mesh.workers[0].routers == ["r:1"]


def test_dashes_name_the_same_setting() -> None:
    mesh = load_mesh("router: {max-new-tokens: 8}\nworkers: [{model: m, max-rows: 2}]\n")
    assert mesh.router.max_new_tokens == 8
    assert mesh.workers[0].max_rows == 2


# -- unknown keys ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("routers: {port: 1}\n", ["routers"]),
        ("router: {prot: 1}\n", ["router", "prot"]),
        ("workers: [{model: m, layer: '0:1'}]\n", ["workers[0]", "layer"]),
        ("workers: [{model: m}, {model: m, prot: 2}]\n", ["workers[1]", "prot"]),
    ],
)
def test_unknown_keys_are_rejected(text: str, names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        load_mesh(text, source="my-mesh.yaml")
    message = str(info.value)
    assert "my-mesh.yaml" in message
    for name in names:
        assert name in message


def test_unknown_cache_keys_are_rejected() -> None:
    # A typo such as `node:` silently leaves the default node in place.
    with pytest.raises(ValueError, match="node"):
        load_mesh("cache: {node: ['10.0.0.9:11211']}\n")


def test_unquoted_layers_are_refused_not_read_as_base_60() -> None:
    # YAML 1.1 reads 15:30 as the sexagesimal number 930: a mesh file must quote it.
    with pytest.raises(ValueError, match="quote it"):
        load_mesh("workers: [{model: m, layers: 15:30}]\n")
    assert load_mesh("workers: [{model: m, layers: '15:30'}]\n").workers[0].layers == "15:30"


def test_unknown_flags_and_env_keys_are_rejected_by_apply() -> None:
    with pytest.raises(ValueError, match="flags.*bogus"):
        apply(WorkerSettings(), {"bogus": 1}, "flags")
    # None means "not given" and leaves the default.
    settings = apply(WorkerSettings(), {"port": None, "model": "m"}, "flags")
    assert settings.port == 50061 and settings.model == "m"


# -- environment -----------------------------------------------------------------------------


def test_env_overrides_router_settings() -> None:
    env = {
        "TESSERA_ROUTER_PORT": "6100",
        "TESSERA_ROUTER_CACHE_NODES": "127.0.0.1:1, 127.0.0.1:2,,",
        "TESSERA_ROUTER_WORKERS": "w:1",
        "TESSERA_ROUTER_CACHE_TIMEOUT_S": "0.25",
        "TESSERA_ROUTER_MAX_OUTSTANDING": "9",
        "TESSERA_WORKER_PORT": "1",  # another service's prefix: ignored
        "TESSERA_ROUTER_": "x",
        "PORT": "2",
    }
    settings = apply_env(RouterSettings(), "TESSERA_ROUTER_", env)
    assert settings.port == 6100 and isinstance(settings.port, int)
    assert settings.cache_nodes == ["127.0.0.1:1", "127.0.0.1:2"]
    assert settings.workers == ["w:1"]
    assert settings.cache_timeout_s == 0.25
    assert settings.max_outstanding == 9
    untouched = {f.name for f in dataclasses.fields(RouterSettings)} - {
        "port",
        "cache_nodes",
        "workers",
        "cache_timeout_s",
        "max_outstanding",
    }
    for name in untouched:
        assert getattr(settings, name) == getattr(RouterSettings(), name), name


def test_env_overrides_worker_settings() -> None:
    env = {
        "TESSERA_WORKER_MODEL": "tiny-llama",
        "TESSERA_WORKER_LAYERS": "0:2",
        "TESSERA_WORKER_ROUTERS": "a:1,b:2",
        "TESSERA_WORKER_PORT": "7000",
        "TESSERA_WORKER_HEARTBEAT_S": "0.5",
        "TESSERA_WORKER_ADVERTISE": "host:7000",
        "TESSERA_WORKER_THREADS": "2",
    }
    settings = apply_env(WorkerSettings(), "TESSERA_WORKER_", env)
    assert (settings.model, settings.layers, settings.port) == ("tiny-llama", "0:2", 7000)
    assert settings.routers == ["a:1", "b:2"]
    assert settings.heartbeat_s == 0.5 and settings.threads == 2
    assert settings.advertise == "host:7000"


def test_env_is_not_read_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TESSERA_ROUTER_PORT", "6200")
    assert RouterSettings().port == 50051
    assert apply_env(RouterSettings(), "TESSERA_ROUTER_").port == 6200
    assert apply_env(RouterSettings(), "TESSERA_ROUTER_", {}).port == 50051


def test_bad_env_values_fail_loudly() -> None:
    with pytest.raises(ValueError):
        apply_env(RouterSettings(), "TESSERA_ROUTER_", {"TESSERA_ROUTER_PORT": "eighty"})
    with pytest.raises(ValueError):
        apply_env(WorkerSettings(), "TESSERA_WORKER_", {"TESSERA_WORKER_HEARTBEAT_S": "soon"})


def test_flags_override_env() -> None:
    """The CLI order: apply_env first, then flags on top."""
    settings = apply_env(
        RouterSettings(),
        "TESSERA_ROUTER_",
        {"TESSERA_ROUTER_PORT": "6300", "TESSERA_ROUTER_HOST": "0.0.0.0"},
    )
    apply(settings, {"port": 6400, "host": None}, "flags")
    assert settings.port == 6400 and settings.host == "0.0.0.0"


# -- one declaration per setting ---------------------------------------------------------------


def test_every_setting_is_declared_with_a_doc() -> None:
    for owner in (RouterSettings, WorkerSettings):
        for f in dataclasses.fields(owner):
            assert f.metadata.get("doc"), f"{owner.__name__}.{f.name} has no doc"


@pytest.mark.parametrize("service, owner", [("router", RouterSettings), ("worker", WorkerSettings)])
def test_every_setting_is_a_flag(service: str, owner: type, capsys: pytest.CaptureFixture) -> None:
    from services.cli import main

    with pytest.raises(SystemExit):
        main([service, "--help"])
    shown = capsys.readouterr().out
    for f in dataclasses.fields(owner):
        assert f"--{f.name.replace('_', '-')}" in shown, f.name


def test_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from services.common.settings import add_flags, settings_from

    monkeypatch.setenv("TESSERA_WORKER_MAX_KV_MB", "12")
    monkeypatch.setenv("TESSERA_WORKER_PORT", "7000")
    parser = argparse.ArgumentParser()
    add_flags(parser, WorkerSettings)
    args = parser.parse_args(["--max-kv-mb", "34", "--router", "a:1,b:2", "--precision", "int8"])
    settings = settings_from(WorkerSettings, args)
    assert (settings.max_kv_mb, settings.port) == (34, 7000)
    assert settings.routers == ["a:1", "b:2"] and settings.precision == "int8"
    with pytest.raises(ValueError, match="precision must be one of"):
        apply(WorkerSettings(), {"precision": "int4"}, "mesh file")


def test_the_readme_tables_are_generated_from_the_declarations() -> None:
    from services.common.settings import readme_with_tables

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert readme_with_tables(readme) == readme, (
        "the README's settings tables are stale: run python -m services.common.settings"
    )
    for owner in (RouterSettings, WorkerSettings):
        for f in dataclasses.fields(owner):
            assert f"| `{f.name}` |" in readme, f.name
