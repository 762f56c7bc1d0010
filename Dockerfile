# The image deploy/kuberay/*.yaml run: Ray 2.60's own GPU image (Python 3.11, CUDA) with this
# project installed, so that every Ray pod imports the same code and `python -m jobs.<name>` works
# as a RayJob entrypoint.
#   docker build -t mask-rcnn-ray:0.1.0 .
FROM rayproject/ray:2.60.0-py311-gpu

WORKDIR /home/ray/mask-rcnn-ray
COPY --chown=ray:users pyproject.toml requirements.lock README.md ./
COPY --chown=ray:users mrcnn mrcnn
COPY --chown=ray:users pipeline pipeline
COPY --chown=ray:users jobs jobs
# The versions of requirements.lock, as `make setup` installs them (constraints: nothing extra).
RUN python -m pip install --no-cache-dir -c requirements.lock . && rm -rf build *.egg-info
