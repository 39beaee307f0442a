# The image every node of cluster.yaml and deploy/ runs: Ray's GPU image at the pinned Ray
# version, plus this project's requirements at the tested versions. Build and push it once per
# release (docs/cluster.md):
#   docker build -t <registry>/mode-on-ray:2.60.0 . && docker push <registry>/mode-on-ray:2.60.0
# Jobs still ship their code with `ray job submit --working-dir .`: the copy in the image is a
# fallback for `ray job submit` without a working dir, and the working dir wins on PYTHONPATH.
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/mode
COPY --chown=ray:users requirements.txt constraints.txt pyproject.toml README.md ./
# Ray itself is already in the image at 2.60.0; the constraints keep everything else at the
# versions the tests ran with. No credentials are baked in: S3 access comes from the node's
# instance profile (cluster.yaml) or the pod's service account (deploy/).
RUN pip install --no-cache-dir -r requirements.txt -c constraints.txt
COPY --chown=ray:users pipeline/ pipeline/
COPY --chown=ray:users jobs/ jobs/
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .
ENV PYTHONUNBUFFERED=1
