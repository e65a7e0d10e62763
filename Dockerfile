# One image for the batchlab API and its workers (docker-compose.yml runs it as both).
#
# torch comes from the wheel index in TORCH_INDEX_URL, at the version constraints.txt
# pins: the CPU index by default; for NVIDIA GPUs the CUDA index that matches the host
# driver (docker-compose.gpu.yml does this for its worker), e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    BATCHLAB_HOME=/var/lib/batchlab

WORKDIR /app

# 1. torch at the version constraints.txt pins, from the chosen index. A CUDA wheel's
#    local version (2.13.0+cuXXX) satisfies the ==2.13.0 pin, so step 2 keeps it.
COPY constraints.txt ./
RUN pip install -c constraints.txt --index-url "${TORCH_INDEX_URL}" torch

# 2. The other dependencies, read from pyproject.toml, before the source is copied so
#    that editing code does not re-download them.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -c constraints.txt -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt

# 3. batchlab itself.
COPY core ./core
COPY trainer ./trainer
COPY store ./store
COPY worker ./worker
COPY server ./server
COPY frontend ./frontend
COPY batchlab ./batchlab
COPY examples ./examples
RUN pip install --no-deps -c constraints.txt . \
 && useradd --create-home --uid 1000 batchlab \
 && mkdir -p "${BATCHLAB_HOME}" \
 && chown batchlab "${BATCHLAB_HOME}"

USER batchlab
EXPOSE 8000
CMD ["batchlab", "api", "--host", "0.0.0.0", "--port", "8000"]
