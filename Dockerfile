# syntax=docker/dockerfile:1
#
# The image every Ray node of a ptxray cluster runs: KubeRay head and worker pods, the RayJob
# submitter, and the Docker containers of `ray up cluster/aws-gpu.yaml`.
#
#   docker build -t <registry>/ptxray:0.1.0 .
#   docker push <registry>/ptxray:0.1.0
#
# ptxray is installed into the image (`pip install .`), so Ray workers import it from here: a
# runtime_env `working_dir` upload is capped at 100 MiB and would be re-sent with every job.
# No credentials are baked in: S3 access comes from the pod (a Secret or IRSA) or the VM's
# instance profile at run time, and the Ray auth token from KubeRay or `ray up` (see README).
# tests/test_dockerfile.py checks this file's structure (base, install step, user).

# The CUDA runtime must match the CUDA build of the pinned torch (torch==2.14.1 is cu130).
# The build fails below if they ever drift apart.
ARG CUDA_VERSION=13.0.0
ARG UV_VERSION=0.9.5

# uv only provides the Python interpreter (python-build-standalone): Ubuntu 24.04 ships 3.12,
# and the cluster should run the Python the project is tested on.
FROM ghcr.io/astral-sh/uv:${UV_VERSION} AS uv

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu24.04 AS runtime

ARG CUDA_VERSION
ARG PYTHON_VERSION=3.11
# The PyTorch index holds the +cu130 builds of the pinned torch/torchvision; everything else
# comes from PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130

ARG DEBIAN_FRONTEND=noninteractive
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python

# rsync and ssh: the Ray cluster launcher syncs files into the container and reaches workers;
# wget: KubeRay's liveness/readiness probes call it.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates rsync openssh-client wget \
 && rm -rf /var/lib/apt/lists/*

# The non-root user the cluster runs as. Ubuntu 24.04 images already own uid 1000 ("ubuntu");
# KubeRay and the manifests in k8s/ expect uid 1000, so that account is replaced.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
 && groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash ray

RUN --mount=from=uv,source=/uv,target=/usr/local/bin/uv \
    uv python install ${PYTHON_VERSION} \
 && uv venv --seed --python ${PYTHON_VERSION} /opt/venv \
 && rm -rf /root/.cache
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# KubeRay starts Ray through `bash -l`; keep the venv first on PATH in login shells too.
RUN echo 'export PATH=/opt/venv/bin:$PATH' > /etc/profile.d/ptxray-venv.sh

WORKDIR /opt/ptxray

# Dependencies first, in their own layer: a code change does not re-download torch.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
 && pip install --no-cache-dir --extra-index-url ${TORCH_INDEX_URL} -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

COPY README.md ./
COPY ptxray ./ptxray
RUN pip install --no-cache-dir --no-deps . \
 && rm -rf build ptxray.egg-info \
 && python -c "import torch, ptxray, ray; want = '${CUDA_VERSION}'.rsplit('.', 1)[0]; got = torch.version.cuda; assert got == want, f'torch is built for CUDA {got}, the base image has CUDA {want}'"

# Ray job entrypoints (`python jobs/kfold.py ...`) run from this folder, the head's working dir.
COPY jobs ./jobs

USER 1000:1000
ENV HOME=/home/ray
CMD ["bash"]
