"""The container image's recipe (Dockerfile, .dockerignore), checked without building it.

Building needs Docker and several GB of downloads, so CI checks the structure instead: the CUDA
base matches the CUDA build of the pinned torch, ptxray is installed with `pip install .`, the
image runs as a non-root uid that the KubeRay manifests expect, the job entrypoints are where
the manifests look for them, and no credential can enter the build context.

The Dockerfile subset parsed here is small (instructions, line continuations, ARG defaults), so
a dozen lines of parsing replace a dependency.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def final_stage(steps: list[tuple[str, str]]) -> tuple[str, list[tuple[str, str]], dict[str, str]]:
    """(resolved base image, the last stage's instructions, ARG defaults visible in it)."""
    global_args: dict[str, str] = {}
    stage_start = 0
    for i, (keyword, arg) in enumerate(steps):
        if keyword == "FROM":
            stage_start = i
        elif keyword == "ARG" and not any(k == "FROM" for k, _ in steps[:i]):
            name, _, default = arg.partition("=")
            global_args[name] = default
    base = expand(steps[stage_start][1].split()[0], global_args)
    stage = steps[stage_start + 1 :]
    args = {}
    for keyword, arg in stage:
        if keyword == "ARG":
            name, _, default = arg.partition("=")
            args[name] = default or global_args.get(name, "")
    return base, stage, args


STEPS = instructions(DOCKERFILE.read_text())
BASE, STAGE, ARGS = final_stage(STEPS)


def torch_cuda_version() -> str:
    """The CUDA version the installed torch was built for ('13.0' for torch 2.14.1+cu130)."""
    import torch

    assert torch.version.cuda, f"the installed torch {torch.__version__} is not a CUDA build"
    return torch.version.cuda


def test_parser_handles_continuations_and_args():
    steps = instructions("ARG A=1\n# c\nFROM img:${A} AS x\nRUN a \\\n  # inner\n  && b\nUSER 7\n")
    assert steps == [("ARG", "A=1"), ("FROM", "img:${A} AS x"), ("RUN", "a    && b"), ("USER", "7")]
    assert final_stage(steps)[0] == "img:1"


def test_base_is_the_cuda_runtime_of_the_pinned_torch():
    pinned = [d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch==")]
    installed = importlib.metadata.version("torch").split("+")[0]
    assert pinned and installed == pinned[0].split("==")[1], f"the installed torch {installed} is not the pinned one"
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", BASE)
    assert m, f"the image must start from an nvidia/cuda runtime image, not {BASE}"
    cuda = torch_cuda_version()
    assert f"{m.group(1)}.{m.group(2)}" == cuda, f"{BASE} does not match the torch built for CUDA {cuda}"
    # The wheels come from the matching PyTorch index, and the build re-checks torch.version.cuda.
    cu = "cu" + cuda.replace(".", "")
    assert ARGS["TORCH_INDEX_URL"].rstrip("/").endswith(cu)
    assert any(k == "RUN" and "torch.version.cuda" in a for k, a in STAGE)


def test_python_in_the_image_satisfies_requires_python():
    version = ARGS["PYTHON_VERSION"]
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(f"{version}.0")


def test_ptxray_is_installed_with_pip_install_dot_after_its_sources():
    copied: list[str] = []
    installed_at = None
    for i, (keyword, arg) in enumerate(STAGE):
        if keyword == "COPY":
            copied += arg.split()[:-1]
        if keyword == "RUN" and re.search(r"pip install\b[^&;|]*\s\.(\s|$)", arg):
            assert "-e" not in arg.split() and "--editable" not in arg, "an editable install points at the build context"
            installed_at = i
            break
    assert installed_at is not None, "no `pip install .`"
    assert {"pyproject.toml", "README.md", "ptxray"} <= {c.rstrip("/").removeprefix("./") for c in copied}


def test_runs_as_the_non_root_uid_the_manifests_expect():
    users = [a for k, a in STAGE if k == "USER"]
    assert users, "no USER: the container would run as root"
    uid, _, gid = users[-1].partition(":")
    # Numeric, so Kubernetes can enforce runAsNonRoot without guessing a name's uid.
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit())
    assert any(k == "RUN" and f"--uid {uid}" in a for k, a in STAGE), "the uid has no account (HOME, ~/.ray)"
    last = max(i for i, (k, _) in enumerate(STAGE) if k == "USER")
    assert not [k for k, _ in STAGE[last:] if k in ("RUN", "COPY", "ADD")], "steps after USER change what it runs as"
    manifests = "\n".join(p.read_text() for p in (REPO / "k8s").rglob("*.yaml"))
    assert set(re.findall(r"runAsUser: (\d+)", manifests)) == {uid}


def test_job_entrypoints_live_in_the_working_directory_of_the_ray_heads():
    workdir = [a for k, a in STAGE if k == "WORKDIR"][-1]
    copies = [a.split() for k, a in STAGE if k == "COPY"]
    assert ["jobs", "./jobs"] in copies or ["jobs", f"{workdir}/jobs"] in copies
    assert (REPO / "jobs" / "kfold.py").is_file()
    heads = []
    for path in (REPO / "k8s" / "base").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec") or {}
            cluster = spec.get("rayClusterSpec", spec) if doc.get("kind") in ("RayCluster", "RayJob") else {}
            if "headGroupSpec" in cluster:
                heads.append(cluster["headGroupSpec"]["template"]["spec"]["containers"][0])
    assert heads and all(h.get("workingDir") == workdir for h in heads), "`python jobs/kfold.py` resolves against workingDir"


SECRET_NAME = re.compile(r"(?i)(secret|passw|token|credential|access_key|api_key|private_key)")


def test_no_credentials_baked_in():
    for keyword, arg in STEPS:
        if keyword in ("ENV", "ARG"):
            names = re.findall(r"(\w+)=", arg) or [arg.split()[0]]
            assert not [n for n in names if SECRET_NAME.search(n)], f"{keyword} {arg}: pass secrets at run time"
        if keyword in ("COPY", "ADD"):
            sources = [s for s in arg.split()[:-1] if not s.startswith("--")]
            assert not [s for s in sources if re.search(r"(^|/)(\.aws|\.kube|\.ssh|\.env|.*\.pem$|credentials)", s)], arg
    text = DOCKERFILE.read_text()
    assert not re.search(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}", text)
    assert "RAY_AUTH_MODE=disabled" not in text


# --- .dockerignore -------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern:
    """Docker's pattern syntax (Go filepath.Match plus `**`) as a regex over '/'-separated paths."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1].replace("[!", "[^"), end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_rules(text: str) -> list[tuple[re.Pattern, bool]]:
    rules = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:].strip() if negate else line
        pattern = "/".join(p for p in pattern.strip("/").split("/") if p not in ("", "."))
        rules.append((_pattern_regex(pattern), negate))
    return rules


def in_build_context(path: str, rules: list[tuple[re.Pattern, bool]]) -> bool:
    """Whether Docker sends `path`: the last pattern matching it or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for regex, negate in rules:
        if any(regex.fullmatch(c) for c in candidates):
            excluded = not negate
    return not excluded


RULES = dockerignore_rules(DOCKERIGNORE.read_text())


def test_dockerignore_matcher():
    rules = dockerignore_rules("*\n!src/\n**/*.pyc\n")
    assert in_build_context("src/a.py", rules) and in_build_context("src/deep/b.py", rules)
    assert not in_build_context("src/x.pyc", rules) and not in_build_context("other.txt", rules)
    assert not in_build_context(".env", rules)
    assert in_build_context(".env", dockerignore_rules("*.txt\n"))


@pytest.mark.parametrize(
    "path",
    [".env", ".env.local", ".aws/credentials", "ptxray/.env", "jobs/key.pem", "id_rsa", ".kube/config",
     ".git/config", ".venv/bin/python", "runs/exp/checkpoint.pt", "demo-data/x.dcm", "tests/data/siim-sample/a.dcm",
     "ptxray/__pycache__/cli.cpython-311.pyc", "k8s/overlays/prod/kustomization.yaml"],
)  # fmt: skip
def test_secrets_data_and_local_state_stay_out_of_the_build_context(path):
    assert not in_build_context(path, RULES)


def test_everything_the_image_copies_is_in_the_build_context():
    sources = [s for k, a in STAGE if k == "COPY" for s in a.split()[:-1] if not s.startswith("--")]
    assert sources
    for source in sources:
        path = REPO / source
        assert path.exists(), f"COPY {source}: not in the repository"
        files = [p for p in path.rglob("*.py")] if path.is_dir() else [path]
        for f in files:
            rel = f.relative_to(REPO).as_posix()
            if "__pycache__" not in rel:
                assert in_build_context(rel, RULES), f"{rel} is copied by the Dockerfile but ignored by .dockerignore"
    assert in_build_context("ptxray/configs/demo.yaml", RULES)
