# matchmap spoken-query search service.
#   docker build -t matchmap .
#   docker run -p 50051:50051 -p 8080:8080 -v matchmap-data:/data matchmap   # gRPC, and the search page on :8080
#   docker run -v matchmap-data:/data --entrypoint matchmap matchmap index --collection photos /data/images
# docker-compose.yml runs it with a health check (and, with --profile postgres, a PostgreSQL catalog).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MATCHMAP_DATA_DIR=/data

# CPU wheels of torch by default (a fraction of the CUDA build's size); for a GPU image build with
#   --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126  and run with --device cuda.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY matchmap ./matchmap
COPY encoders ./encoders
COPY training ./training
COPY indexer ./indexer
COPY search ./search
COPY protos ./protos
RUN pip install --extra-index-url "${TORCH_INDEX}" . \
 && useradd --create-home --uid 10001 matchmap \
 && mkdir -p /data \
 && chown matchmap /data

USER matchmap
VOLUME ["/data"]
EXPOSE 50051 8080
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "search.healthcheck", "--target", "localhost:50051"]
ENTRYPOINT ["matchmap", "serve"]
CMD ["--data-dir", "/data", "--port", "50051", "--http", "8080"]
