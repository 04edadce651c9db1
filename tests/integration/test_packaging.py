"""Packaging: the wheel's contents and metadata, an install without extras, the recipes extra.

The wheel is built from a copy of the working tree (what a clone holds: tracked and untracked,
not ignored files) with ``pip wheel --no-build-isolation`` (setuptools comes with the dev
extra), and installed with pip into a fresh virtual environment. A fresh environment with its
own torch would take minutes and gigabytes here, so the fresh environment reads its
dependencies from the dev environment through a ``.pth`` path entry: a folder of links to the
dev site-packages minus every distribution that the ``[recipes]`` and ``[dev]`` extras pull in
and the core dependencies do not (computed from the installed metadata, not listed by hand).
Path entries never run the dev environment's own ``.pth`` hooks, so the editable install of
the checkout stays out of it.
"""

from __future__ import annotations

import ast
import email.parser
import functools
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomllib
from packaging.markers import default_environment
from packaging.requirements import Requirement

import lightning_norms
from lightning_norms import callbacks, data

ROOT = Path(__file__).resolve().parents[2]
# one worker builds the wheel and the fresh environment once (make test runs --dist loadgroup)
pytestmark = pytest.mark.xdist_group("packaging")
LAUNCHERS = sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if "cli_main" in p.read_text())
CORE = {"torch", "torchvision", "lightning", "rich"}
RECIPES_EXTRA = {"jsonargparse", "matplotlib", "scikit-learn", "torchmetrics"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", PYTHONHASHSEED="0", NO_COLOR="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 300, **env: str) -> str:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-4000:]}"
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_closure(requirements: list[str], extras: tuple[str, ...] = ("",)) -> set[str]:
    """Names of every installed distribution that ``requirements`` pull in, transitively."""
    seen: set[str] = set()
    todo = [(Requirement(r), extras) for r in requirements]
    while todo:
        req, req_extras = todo.pop()
        env = default_environment()
        if req.marker is not None and not any(
            req.marker.evaluate({**env, "extra": e}) for e in req_extras
        ):
            continue
        name = _norm(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue
        sub_extras = ("", *sorted(req.extras))
        todo += [(Requirement(r), sub_extras) for r in dist.requires or []]
    return {key.partition("[")[0] for key in seen}


@functools.cache
def _packages_distributions() -> dict[str, list[str]]:
    return dict(md.packages_distributions())


def _extra_only_dists() -> set[str]:
    """Distributions that only the ``[recipes]`` and ``[dev]`` extras install."""
    return _dist_closure(["lightning-norms[recipes,dev]"]) - _dist_closure(sorted(CORE))


def _top_level_entries(dists: set[str]) -> set[str]:
    """The site-packages entries (folders, modules, dist-info) holding ``dists``' files."""
    entries = set()
    for name in dists:
        for file in md.distribution(name).files or []:
            if file.parts and file.parts[0] != "..":
                entries.add(file.parts[0])
    return entries


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a clean copy of the working tree."""
    tmp = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    src = tmp / "src"
    for rel in filter(None, listed):
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    _run([*cmd, "-w", str(tmp / "dist"), str(src)], cwd=tmp)
    (built,) = (tmp / "dist").glob("*.whl")
    return built


@pytest.fixture(scope="module")
def metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as zf:
        (name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(zf.read(name).decode())


@pytest.fixture(scope="module")
def fresh_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtual environment holding the wheel and, read from this one, its core deps.

    The core dependencies come from a folder of links to this environment's site-packages
    without the distributions only the extras install (so they are not installed, for
    ``import`` and ``importlib.util.find_spec`` alike). ``LN_WITH_EXTRAS=1`` appends this
    environment's whole site-packages: ``pip install "lightning-norms[recipes]"``.
    """
    tmp = tmp_path_factory.mktemp("venv")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    python = venv / "bin" / "python"
    site = Path(
        _run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], cwd=tmp).strip()
    )
    purelib = Path(sysconfig.get_paths()["purelib"])
    skip = _top_level_entries(_extra_only_dists() | {"lightning-norms"})
    core = tmp / "core_deps"
    core.mkdir()
    for entry in purelib.iterdir():
        if entry.name not in skip and entry.suffix != ".pth" and "editable" not in entry.name:
            (core / entry.name).symlink_to(entry)
    with_extras = f"os.environ.get('LN_WITH_EXTRAS') and sys.path.append({str(purelib)!r})"
    (site / "_deps.pth").write_text(f"{core}\nimport os, sys; {with_extras}\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    _run([*pip, "--ignore-installed", "--no-compile", str(wheel)], cwd=tmp)
    return venv


@pytest.mark.slow
def test_wheel_holds_only_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    version = lightning_norms.__version__
    dist_info = f"lightning_norms-{version}.dist-info/"
    assert wheel.name == f"lightning_norms-{version}-py3-none-any.whl"
    assert {n.split("/")[0] + "/" for n in names} == {"lightning_norms/", dist_info}
    package = ROOT / "lightning_norms"
    sources = {
        p.relative_to(ROOT).as_posix()
        for p in package.rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert sources <= set(names), sorted(sources - set(names))
    assert "lightning_norms/py.typed" in names
    assert "lightning_norms/recipes/__init__.py" in names
    assert f"{dist_info}licenses/LICENSE" in names
    assert not [n for n in names if re.match(r"(recipes|tests|bench|docs)/", n)]
    entry_points = zipfile.ZipFile(wheel).read(f"{dist_info}entry_points.txt").decode()
    assert "lightning-norms = lightning_norms.recipes.report:main" in entry_points


@pytest.mark.slow
def test_wheel_metadata(metadata: email.message.Message) -> None:
    assert metadata["Name"] == "lightning-norms"
    assert metadata["Version"] == lightning_norms.__version__
    assert metadata["License-Expression"] == "Apache-2.0"
    assert metadata.get_all("License-File") == ["LICENSE"]
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    assert {u.split(",")[0] for u in metadata.get_all("Project-URL")} >= {
        "Homepage",
        "Documentation",
        "Repository",
        "Issues",
    }
    assert set(metadata.get_all("Provides-Extra")) == {"recipes", "dev"}
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    core = {r.name for r in requires if r.marker is None}
    recipes = {r.name for r in requires if r.marker and r.marker.evaluate({"extra": "recipes"})}
    assert core == CORE
    assert recipes == RECIPES_EXTRA
    assert "Batch Normalization" in metadata.get_payload()  # the README is the description


def test_version_has_one_source() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["project"]["dynamic"] == ["version"]
    attr = pyproject["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "lightning_norms.__version__"
    assigned = [
        p for p in (ROOT / "lightning_norms").rglob("*.py") if "__version__ =" in p.read_text()
    ]
    assert assigned == [ROOT / "lightning_norms" / "__init__.py"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", lightning_norms.__version__)


def test_core_modules_import_only_core_dependencies() -> None:
    """Module-level imports outside ``lightning_norms.recipes``: stdlib, core deps, ourselves."""
    allowed = set(sys.stdlib_module_names) | {"lightning_norms", "typing_extensions"}
    core = _dist_closure(sorted(CORE))
    allowed |= {m for m, d in _packages_distributions().items() if _norm(d[0]) in core}
    found: dict[str, str] = {}
    for path in (ROOT / "lightning_norms").rglob("*.py"):
        if "recipes" in path.relative_to(ROOT).parts:
            continue
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            found.update({n.partition(".")[0]: path.name for n in names})
    assert {m: f for m, f in found.items() if m not in allowed} == {}
    assert {"torch", "lightning"} <= set(found)


def test_extra_only_set_is_what_the_extras_add() -> None:
    """What the no-extras environment below leaves out: recipe and dev deps, never core ones."""
    left_out = _top_level_entries(_extra_only_dists())
    assert {"jsonargparse", "matplotlib", "sklearn", "scipy", "timm", "pytest"} <= left_out
    assert not {"torch", "torchvision", "lightning", "rich", "numpy", "yaml"} & left_out
    # Lightning itself requires torchmetrics: it is installed without our extras too
    assert "torchmetrics" in _dist_closure(["lightning"])


NO_EXTRAS_SCRIPT = textwrap.dedent("""
    import sys, torch, lightning as L
    from torch import nn
    import torch.nn.functional as F
    for name in ("jsonargparse", "matplotlib", "sklearn", "scipy", "timm"):
        try:
            __import__(name)
        except ModuleNotFoundError:
            continue
        sys.exit(f"{name} is importable: the environment has extras")
    import lightning_norms
    assert lightning_norms.__file__.startswith(sys.prefix), lightning_norms.__file__
    from lightning_norms import BatchRenorm2d, DomainBatchNorm2d, LayerNorm2d, convert_norms
    from lightning_norms.callbacks import BatchNormDoctor, PreciseBN

    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    ref = nn.BatchNorm2d(3)(x)
    assert torch.allclose(DomainBatchNorm2d(3, num_domains=2)(x, domain=1), ref, atol=1e-5)
    assert torch.allclose(BatchRenorm2d(3, r_max=1.0, d_max=0.0)(x), ref, atol=1e-5)
    ln2d = F.layer_norm(x.permute(0, 2, 3, 1), (3,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(LayerNorm2d(3)(x), ln2d, atol=1e-5)
    converted = convert_norms(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), "renorm")
    assert isinstance(converted[1], BatchRenorm2d)

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return F.mse_loss(self.net(batch[0]), batch[1])

        def validation_step(self, batch, batch_idx):
            self.log("val_loss", F.mse_loss(self.net(batch[0]), batch[1]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    data = torch.utils.data.TensorDataset(torch.randn(64, 4) * 3 + 2, torch.randn(64, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=16, shuffle=True)
    model = Tiny()
    doctor = BatchNormDoctor(verbosity="full")  # every layer's row, in a table
    trainer = L.Trainer(max_epochs=2, callbacks=[PreciseBN(num_batches=4), doctor],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader, torch.utils.data.DataLoader(data, batch_size=16))
    with torch.no_grad():
        acts = model.net[0](data.tensors[0]).double()
    bn = model.net[1]
    assert torch.allclose(bn.running_mean.double(), acts.mean(0), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), acts.var(0), rtol=1e-5)
    print("NO-EXTRAS-OK")
""")


@pytest.mark.slow
def test_install_without_extras_runs_layers_and_callbacks(fresh_venv: Path) -> None:
    """``pip install lightning-norms``: layers, PreciseBN (exact) and BatchNormDoctor in a fit."""
    script = fresh_venv.parent / "no_extras.py"
    script.write_text(NO_EXTRAS_SCRIPT)
    out = _run(
        [str(fresh_venv / "bin" / "python"), str(script)], cwd=fresh_venv.parent, COLUMNS="120"
    )
    assert "NO-EXTRAS-OK" in out
    assert "BatchNormDoctor" in out and "───" in out  # the doctor's tables, ruled by rich


@pytest.mark.slow
def test_recipes_extra_console_script_writes_a_report(fresh_venv: Path) -> None:
    """``pip install "lightning-norms[recipes]"``: ``lightning-norms report`` end to end.

    One run of one variant (two steps) instead of ``--help``: it loads every recipe dependency
    (argparse alone would not) and writes the three files, plot included.
    """
    script = fresh_venv / "bin" / "lightning-norms"
    args = [
        "--seeds",
        "1",
        "--epochs",
        "1",
        "--max-steps",
        "2",
        "--variants",
        "mixed",
        "--jobs",
        "1",
        "--no-progress",
        "--output-dir",
        "report",
    ]
    out = _run([str(script), "report", *args], cwd=fresh_venv.parent, LN_WITH_EXTRAS="1")
    assert "| mixed | batch | mixed |" in out
    written = {p.name for p in (fresh_venv.parent / "report").iterdir()}
    assert {"results.json", "report.md", "accuracy.png"} <= written


@pytest.mark.slow
@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_fast_dev_run_against_the_wheel(
    fresh_venv: Path, tmp_path: Path, name: str
) -> None:
    """``python -m recipes.<name> fit --trainer.fast_dev_run 1`` from a clone, wheel installed."""
    shutil.copytree(
        ROOT / "recipes", tmp_path / "recipes", ignore=shutil.ignore_patterns("__pycache__")
    )
    python = str(fresh_venv / "bin" / "python")
    code = "import lightning_norms, sys; print(lightning_norms.__file__)"
    assert _run([python, "-c", code], cwd=tmp_path).startswith(str(fresh_venv))
    _run(
        [
            python,
            "-m",
            f"recipes.{name}",
            "fit",
            "--trainer.fast_dev_run",
            "1",
            "--trainer.accelerator",
            "cpu",
        ],
        cwd=tmp_path,
        LN_WITH_EXTRAS="1",
    )
    assert list((tmp_path / "runs" / name).glob("*.json")), "no JSON record written"


@pytest.mark.slow
@pytest.mark.parametrize("name", [*LAUNCHERS, "report"])
def test_module_entry_point_from_the_wheel(fresh_venv: Path, tmp_path: Path, name: str) -> None:
    """``python -m lightning_norms.recipes.<name> --help`` outside any clone, from the wheel."""
    python = str(fresh_venv / "bin" / "python")
    module = f"lightning_norms.recipes.{name}"
    code = f"import importlib.util as u; print(u.find_spec({module!r}).origin)"
    assert _run([python, "-c", code], cwd=tmp_path, LN_WITH_EXTRAS="1").startswith(
        str(fresh_venv)
    )
    out = _run([python, "-m", module, "--help"], cwd=tmp_path, LN_WITH_EXTRAS="1", COLUMNS="80")
    assert out.lstrip().startswith("usage:")
    expected = "lightning-norms" if name == "report" else "fit"  # the LightningCLI's subcommands
    assert expected in out


@pytest.mark.slow
def test_docs_build_strict(tmp_path: Path) -> None:
    """``make docs``: the API reference builds from the docstrings without a single warning."""
    site = tmp_path / "site"
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    out = _run(cmd, cwd=ROOT, NO_MKDOCS_2_WARNING="1")
    assert "WARNING" not in out
    page = (site / "api" / "stats" / "index.html").read_text()
    assert "recompute_bn_stats" in page and "&gt;&gt;&gt;" in page  # doctests shown as code
    assert ":func:" not in page  # Sphinx roles rendered as code
    distributed = (site / "api" / "distributed" / "index.html").read_text()
    assert "track_running_stats" in distributed  # grouped Args items split per parameter
    anchors = {
        anchor
        for html in site.rglob("*.html")
        for anchor in re.findall(r'id="lightning_norms\.([\w.]+)"', html.read_text())
    }
    public = [n for n in lightning_norms.__all__ if n not in ("functional", "stats", "callbacks")]
    public += [*callbacks.__all__, *data.__all__, "recompute_bn_stats"]
    public.remove("data")
    documented = {anchor.rsplit(".", 1)[-1] for anchor in anchors}
    assert sorted(set(public) - documented) == []  # every public name has its entry


@pytest.mark.slow
def test_readme_python_blocks_run_from_the_wheel(fresh_venv: Path, tmp_path: Path) -> None:
    """A fresh venv holding only the wheel and its core dependencies (``pip install .``) runs
    every Python block of the README verbatim, outside the clone."""
    from tests.integration.test_readme import PYTHON_BLOCKS

    assert PYTHON_BLOCKS
    for block_id, code in PYTHON_BLOCKS:
        script = tmp_path / f"{block_id}.py"
        script.write_text(code)
        _run([str(fresh_venv / "bin" / "python"), str(script)], cwd=tmp_path, timeout=600)
