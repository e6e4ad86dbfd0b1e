"""The import graph of ``api/``, ``worker/`` and ``services/`` (read by grimp from the source, lazy imports
included): the gateway is above the worker, the worker above the library, and the library's packages in
one declared order, so that no import runs back up and no two packages import each other."""

from graphlib import CycleError, TopologicalSorter

import grimp
import pytest

# Each layer may import only the layers after it. The gateway queues tasks (api -> worker); the worker runs
# services' jobs; services serves both and imports neither.
TOP_LEVEL = ["api", "worker", "services"]

# services' packages (and loose modules), highest first: each may import only those after it. Jobs run
# everything; serving resolves versions in the registry; the registry publishes exported models (export,
# models, datasets for checkpoint import); training, evaluation and the models build on ECG signals;
# datasets read recordings and store their rows (db); config and errors sit under everything.
SERVICES_ORDER = [
    "jobs",
    "inference",
    "registry",
    "evaluation",
    "export",
    "training",
    "models",
    "datasets",
    "observability",  # logs (configuration, request and job ids, the epoch line) and Prometheus metrics
    "ecg",
    "db",
    grimp.Layer("config", "errors"),
]


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*TOP_LEVEL, cache_dir=None)


def _describe(dependencies: set) -> str:
    lines = []
    for dependency in sorted(dependencies, key=lambda d: (d.importer, d.imported)):
        for route in dependency.routes:
            chain = [*route.heads, *route.middle, *route.tails]
            lines.append(f"{dependency.importer} -> {dependency.imported}: {' -> '.join(sorted(chain))}")
    return "\n".join(lines)


def test_api_over_worker_over_services(graph: grimp.ImportGraph) -> None:
    illegal = graph.find_illegal_dependencies_for_layers(layers=TOP_LEVEL)
    assert not illegal, "imports that run back up:\n" + _describe(illegal)
    assert graph.direct_import_exists(importer="api", imported="worker", as_packages=True)  # (read)


def test_services_packages_in_their_declared_order(graph: grimp.ImportGraph) -> None:
    declared = set()
    for layer in SERVICES_ORDER:
        declared |= set(layer.module_tails) if isinstance(layer, grimp.Layer) else {layer}
    children = {module.removeprefix("services.") for module in graph.find_children("services")}
    assert children == declared, "every package of services/ has its place in SERVICES_ORDER"
    illegal = graph.find_illegal_dependencies_for_layers(layers=SERVICES_ORDER, containers={"services"})
    assert not illegal, "imports against SERVICES_ORDER:\n" + _describe(illegal)


def test_no_cycle_between_services_packages(graph: grimp.ImportGraph) -> None:
    children = graph.find_children("services")
    imports: dict[str, set[str]] = {child: set() for child in children}
    for importer in children:
        for imported in children - {importer}:
            if graph.direct_import_exists(importer=importer, imported=imported, as_packages=True):
                imports[importer].add(imported)
    try:
        order = list(TopologicalSorter(imports).static_order())
    except CycleError as exc:
        pytest.fail(f"services' packages import each other in a cycle: {' -> '.join(exc.args[1])}")
    assert order[-1] == "services.jobs" and imports["services.jobs"]  # (the graph was read: jobs import)
