# The image every node of cluster.yaml and deploy/ runs: Ray's GPU image at the pinned Ray
# version, plus this project's requirements at the tested versions. Build and push it once per
# release (docs/cluster.md):
#   docker build -t <registry>/mode-on-ray:2.60.0 . && docker push <registry>/mode-on-ray:2.60.0
# Jobs still ship their code with `ray job submit --working-dir .`: the copy in the image is a
# fallback for `ray job submit` without a working dir, and the working dir wins on PYTHONPATH.
FROM rayproject/ray:2.60.0-py311-gpu

# torch's CUDA build, chosen here and checked below: PyTorch's CUDA 13.0 wheels (torch
# 2.14.1+cu130, the build the tests run), which bring their own CUDA 13.0 runtime, cuDNN 9 and
# NCCL as pip packages, so the base image's CUDA toolkit is not the one that counts. A CUDA 13.0
# build needs an NVIDIA driver >= 580.65.06 on the host (cluster.yaml's machine image ships 580,
# metadata.min_nvidia_driver there) and a GPU of compute capability 7.5 or newer (the g5 nodes'
# A10G is 8.6). Another build (e.g. cu128 for hosts with a 570 driver) changes both values, and
# cluster.yaml's metadata with them.
ARG TORCH_CUDA=13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130

WORKDIR /home/ray/mode
COPY --chown=ray:users requirements.txt constraints.txt pyproject.toml README.md ./
# Ray itself is already in the image at 2.60.0; the constraints keep everything else at the
# versions the tests ran with, torch included (==2.14.1 accepts the index's 2.14.1+cu130). No
# credentials are baked in: S3 access comes from the node's instance profile (cluster.yaml) or the
# pod's service account (deploy/).
RUN pip install --no-cache-dir --extra-index-url "$TORCH_INDEX" -r requirements.txt -c constraints.txt
# The build fails here, not on a GPU node days later, if pip resolved another CUDA build.
RUN python -c "import sys, torch; sys.exit(None if torch.version.cuda == '$TORCH_CUDA' else \
    f'torch {torch.__version__} is built for CUDA {torch.version.cuda}, not $TORCH_CUDA')"
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users jobs/ jobs/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .
ENV PYTHONUNBUFFERED=1
