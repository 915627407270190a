# Image of the workflow: every job runs in it under `--software-deployment-method apptainer`
# (config key `container`), and `docker run IMAGE snakemake --cores 8 --resources gpu=1` runs the
# workflow copied into /workflow.
#
# Versions: uv.lock is the one list of exact versions (the test environment and envs/d2retrain.yaml
# come from it too). The build runs `uv export` on it, at the uv version the lock holds, and installs
# every runtime package plus detectron2's own dependencies, the tracker and MLflow (the `detectron2`,
# `track` and `mlflow` extras), with --no-deps: the pins are complete, and pip would add the opencv-python that
# uv.lock overrides away (pyproject.toml). The only
# versions written here are those a Python lock cannot hold: the base image (which brings the locked
# torch and torchvision, built for the CUDA release the lock's nvidia-* wheels are from, plus nvcc)
# and detectron2's commit. tests/test_environments.py checks them against uv.lock.
FROM pytorch/pytorch:2.15.0-cuda13.2-cudnn9-devel

# git to fetch detectron2; g++ and ninja to build its C++/CUDA operators. Build tools only, so
# left to the Ubuntu release the base image pins.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends git g++ ninja-build \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The pins, exported from uv.lock for this image's Python and platform (uv's markers decide), used
# as the requirements here and as constraints of the detectron2 step, so nothing there moves them.
ARG UV_VERSION=0.13.9
COPY pyproject.toml uv.lock /opt/d2retrain/
RUN python -m pip install "uv==${UV_VERSION}" \
    && uv export --project /opt/d2retrain --frozen --no-dev --no-emit-project --no-hashes --no-header \
        --no-annotate --extra detectron2 --extra track --extra mlflow -o /opt/d2retrain/pins.txt \
    && cat /opt/d2retrain/pins.txt \
    && python -m pip install --no-deps -r /opt/d2retrain/pins.txt

# detectron2 from its repository at a fixed commit, built against the torch above (hence
# --no-build-isolation; its setup.py and model_zoo import pkg_resources, gone in setuptools 81:
# the lock holds setuptools<81 for this reason, and the pins installed it above).
# No GPU is visible during `docker build`: FORCE_CUDA builds the CUDA operators anyway, for
# every architecture CUDA 13 supports (Turing T4 .. Blackwell; PTX for later ones). Narrow
# TORCH_CUDA_ARCH_LIST with --build-arg for a faster build.
ARG DETECTRON2_COMMIT=02b5c4e295e990042a714712c21dc79b731e8833
ARG TORCH_CUDA_ARCH_LIST="7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"
ENV FORCE_CUDA=1 \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}
RUN python -m pip install --no-build-isolation -c /opt/d2retrain/pins.txt \
        "detectron2 @ git+https://github.com/facebookresearch/detectron2.git@${DETECTRON2_COMMIT}" \
    && python -c "import torch; from detectron2 import _C"

# The project (its dependencies are all pinned above, hence --no-deps) and the workflow, under a
# user that owns /workflow, where results/, logs/ and .snakemake/ are written.
# uid 1000, the usual first user of a host (Ubuntu 24.04 images give it to `ubuntu`: removed).
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && useradd --create-home --uid 1000 --shell /bin/bash d2retrain \
    && install -d -o d2retrain -g d2retrain /workflow
WORKDIR /workflow
COPY pyproject.toml README.md ./
COPY src/ src/
RUN python -m pip install --no-deps --no-build-isolation . \
    && rm -rf build src/*.egg-info \
    && d2retrain --version
COPY Snakefile ./
COPY config/ config/
COPY envs/ envs/
COPY workflow/ workflow/
USER d2retrain

# `docker run IMAGE` runs the embedded demo; name any snakemake command to run another.
CMD ["snakemake", "--cores", "all", "--resources", "gpu=1"]
