# mhc-daemon container image: the wheel is built in the first stage and installed, alone, in the second.
# Build: docker build -t mhc-daemon .   Run: see deploy/docker-compose.yml and deploy/README.md.

FROM python:3.11-slim AS build
WORKDIR /src
RUN pip install --no-cache-dir build==1.2.2
COPY pyproject.toml README.md ./
COPY daemon ./daemon
COPY sql ./sql
RUN python -m build --wheel --outdir /dist

FROM python:3.11-slim
# Inside the container the endpoint must listen on every interface so the host can publish the port;
# outside a container the default stays loopback.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    MHC_HEALTH_HOST=0.0.0.0 \
    MHC_HEALTH_PORT=8787 \
    MHC_DATA_DIR=/var/lib/mhc-daemon \
    MHC_LOG_FORMAT=json
# A fixed, non-root uid: the embedded PostgreSQL refuses to run as root, and volumes keep their owner.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/mhc-daemon --create-home mhc
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir /tmp/dist/*.whl && rm -rf /tmp/dist
USER 10001:10001
WORKDIR /var/lib/mhc-daemon
VOLUME ["/var/lib/mhc-daemon"]
EXPOSE 8787
# A first start may initialise the embedded database and wait for the first poll: give it time.
HEALTHCHECK --interval=30s --timeout=10s --start-period=180s --retries=3 CMD ["mhc-daemon", "health"]
ENTRYPOINT ["mhc-daemon", "run"]
